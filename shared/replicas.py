"""Which of a service's replicas a command means: ``zlayerctl logs`` and ``exec`` pick them
as the REST API's logs and exec routes do, with the same sentences when none fits."""

from __future__ import annotations

from shared.bus import ConflictError, NotFoundError
from shared.wire.agent import ReplicaInfo


def select_replicas(
    replicas: list[ReplicaInfo], deployment: str, service: str, which: str | int | None = None
) -> list[ReplicaInfo]:
    """The replicas of the service's newest revision, by instance; only the one ``which``
    names (its id or its instance number) when it is given. NotFoundError when the service
    has no replica here, or none is ``which``."""
    if not replicas:
        raise NotFoundError(f"service {service} of {deployment} has no replicas")
    newest = max(r.revision for r in replicas)
    current = sorted((r for r in replicas if r.revision == newest), key=lambda r: r.instance)
    if which is None or which == "":
        return current
    chosen = [r for r in current if str(which) in (r.id, str(r.instance))]
    if not chosen:
        have = ", ".join(str(r.instance) for r in current)
        raise NotFoundError(f"{service} has no replica {which} (replicas: {have})")
    return chosen


def first_running(replicas: list[ReplicaInfo], service: str) -> ReplicaInfo:
    """The first running one of ``replicas`` (where exec goes); ConflictError if none runs."""
    for replica in replicas:
        if replica.state == "running":
            return replica
    raise ConflictError(f"no replica of {service} is running; see `zlayerctl ps --containers`")
