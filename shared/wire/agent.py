"""agentd's values: what schedd assigns it, its replicas, their stats and job runs."""

from __future__ import annotations

from typing import Any, Literal

from shared.wire import Wire

ReplicaState = Literal[
    "creating", "initializing", "running", "exited", "restarting", "stopping", "stopped", "failed"
]
HealthState = Literal["none", "starting", "healthy", "unhealthy"]
ReplicaType = Literal["service", "job", "cron"]
JobTrigger = Literal["manual", "schedule", "deploy"]  # what started a job run


class RevisionReplicas(Wire, frozen=True):
    """An older revision of a service that keeps ``replicas`` copies during a rollout."""

    revision: int
    spec: dict[str, Any]
    replicas: int


class ServiceAssignment(Wire, frozen=True):
    """schedd -> agentd: run ``replicas`` copies of this service at this revision.

    During a rollout ``previous`` names the older revisions that keep running
    (instances 1..replicas of each); every other revision's replicas go.
    """

    deployment: str
    service: str
    revision: int
    spec: dict[str, Any]  # ServiceSpec in JSON mode, with $E: references resolved
    replicas: int
    previous: list[RevisionReplicas] = []
    # Bumped by every deploy: a replica waiting out a failed start's backoff
    # tries again at once when it changes (the user fixed the cause and redeployed).
    retry: int = 0
    # ``zlayerctl stop --timeout/--force``: the stop grace for replicas this
    # assignment removes, instead of the spec's stop_grace_period.
    grace: float | None = None
    # In a cluster, the instance numbers placed on this node (of every revision named
    # here); empty: all of them, 1..replicas, as on a lone node.
    instances: list[int] = []


class NodeAssignments(Wire, frozen=True):
    """``SyncAssignments``: everything this node should run, from schedd.

    A complete view, never a delta: agentd replaces its assignments with
    these and removes the replicas of every service the view does not name.
    A view older than the one agentd holds (a lower ``generation``) is refused.
    """

    generation: int
    assignments: list[ServiceAssignment] = []


class SyncResult(Wire, frozen=True):
    """The answer to a full-view sync (agentd's assignments, overlayd's and proxyd's traffic).

    ``generation`` is what the receiver holds after the call: the view's when
    ``accepted``, a newer one otherwise (the sender then moves past it).
    ``refusals`` maps a deployment to the sentence saying why its part of the
    view could not be applied; ``removed`` says what was removed because the
    view no longer names it, one sentence each, for schedd's events.
    """

    generation: int
    accepted: bool
    refusals: dict[str, str] = {}
    removed: list[tuple[str, str]] = []  # (deployment, sentence)


class ReplicaInfo(Wire, frozen=True, kw_only=True):
    """One replica on this node, as agentd sees it."""

    id: str  # container id: <deployment>-<service>-<instance>-<revision>
    deployment: str
    service: str
    instance: int  # 1-based
    revision: int
    rtype: ReplicaType = "service"
    image: str
    state: ReplicaState
    health: HealthState = "none"
    pid: int = 0
    address: str = ""
    exit_code: int | None = None
    oom_killed: bool = False
    restarts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    message: str = ""  # why it is in this state, for people
    node: str = ""  # in a cluster, the id of the node that runs it
    refused: bool = False  # failed because its spec can never run: not retried until a deploy


class ReplicaStats(Wire, frozen=True):
    """A replica's resource use, read from its cgroup."""

    id: str
    cpu_usage_usec: int
    cpu_percent: float  # over the last sampling interval, 100 = one core
    memory_bytes: int
    memory_limit_bytes: int | None
    pids: int
    pids_limit: int | None


class JobRun(Wire, frozen=True, kw_only=True):
    """One run of a job or cron service."""

    id: str
    deployment: str
    service: str
    trigger: JobTrigger
    state: Literal["running", "succeeded", "failed"]
    exit_code: int | None = None
    started_at: float
    finished_at: float | None = None
    message: str = ""
