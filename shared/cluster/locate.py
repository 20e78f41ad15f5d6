"""Where the replicas a command means run: on this node, or on which other node of the
cluster (:func:`locate`), and what a reader of several nodes' logs could not read
(:class:`Unread`).

Only the bus and the wire: a lone node, and a command that finds every replica here,
never loads gRPC and the PKI that :mod:`shared.cluster.remote` needs to reach another
node (apid carries about 16 MB less for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared import replicas
from shared.bus import InvalidArgumentError
from shared.replicas import select_replicas
from shared.wire.agent import ReplicaInfo
from shared.wire.cluster import NodeList, NodeRecord


@dataclass(frozen=True)
class Placed:
    """A replica and where it runs: here, or on ``node`` (None there: a node no longer
    in the cluster); ``caller`` is this node's record (how it reaches ``node``)."""

    replica: ReplicaInfo
    here: bool = True
    node: NodeRecord | None = None
    caller: NodeRecord | None = None


class _Scheduler(Protocol):
    async def list_nodes(self) -> NodeList: ...

    async def cluster_replicas(self, deployment: str = "") -> list[ReplicaInfo]: ...


class _Agent(Protocol):
    async def list_replicas(self, deployment: str = "", service: str = "") -> list[ReplicaInfo]: ...


async def cluster_nodes(scheduler: _Scheduler) -> NodeList | None:
    """The live nodes as schedd sees them; None on a lone node (or a schedd that cannot
    say: then only this node's replicas are reached)."""
    from sdbus import DbusFailedError

    try:
        return await scheduler.list_nodes()
    except (InvalidArgumentError, DbusFailedError):
        return None


async def locate(
    agent: _Agent, scheduler: _Scheduler, deployment: str, service: str, which: str | int | None
) -> list[Placed]:
    """The replicas ``which`` names (every one for ""/None) of the service's newest revision,
    on whichever node of the cluster runs each (:func:`shared.replicas.select_replicas`)."""
    nodes = await cluster_nodes(scheduler)
    if nodes is None:
        local = await agent.list_replicas(deployment, service)
        return [Placed(r) for r in select_replicas(local, deployment, service, which)]
    found = [r for r in await scheduler.cluster_replicas(deployment) if r.service == service]
    records = {record.id: record for record in nodes.nodes}
    own = records.get(nodes.this_node)
    return [
        Placed(r)
        if r.node in ("", nodes.this_node)
        else Placed(r, here=False, node=records.get(r.node), caller=own)
        for r in select_replicas(found, deployment, service, which)
    ]


def first_running(placed: list[Placed], service: str) -> Placed:
    """Where exec goes: the first running one (``shared.replicas.first_running``)."""
    running = replicas.first_running([p.replica for p in placed], service)
    return next(p for p in placed if p.replica.id == running.id)


# ---------------------------------------------------------------- the calling node


class Unread:
    """Replicas of other nodes whose logs could not be read, by node: a caller reading
    several shows the others' and says once per node which were left out; a node that
    failed once is not waited for again for its other replicas."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[Exception, list[str]]] = {}
        self.read = 0  # replicas whose logs were read

    def failed(self, replica: ReplicaInfo) -> bool:
        """Whether the node of ``replica`` already failed: skip it (:meth:`add` it)."""
        return replica.node in self._nodes

    def add(self, replica: ReplicaInfo, error: Exception) -> None:
        self._nodes.setdefault(replica.node, (error, []))[1].append(replica.id)

    @property
    def first(self) -> Exception | None:
        """The first node's error: what to raise when no replica could be read."""
        return next((error for error, _ in self._nodes.values()), None)

    def warnings(self) -> list[str]:
        """One sentence per node that could not be read."""
        return [
            f"the logs of {', '.join(ids)} are not shown: {error}"
            for error, ids in self._nodes.values()
        ]
