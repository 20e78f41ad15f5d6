"""Runtime data the daemons exchange over the bus (not the deployment spec).

Rich values cross the bus as JSON text (D-Bus type ``s``) of these models:
the sender builds the model and sends ``model_dump_json()``, the receiver
calls ``Model.model_validate_json()``, so both ends are typed and a malformed
value fails loudly at the boundary instead of deep inside a daemon.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Wire(BaseModel):
    """Base of every bus model: unknown fields rejected, instances immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- registryd


class ImageConfig(Wire):
    """The parts of an OCI image config that shape a container."""

    entrypoint: list[str] = Field(default_factory=list)
    cmd: list[str] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list)  # "NAME=value", as in the image
    workdir: str = ""
    user: str = ""
    exposed_ports: list[str] = Field(default_factory=list)  # "80/tcp"
    stop_signal: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class ImageInfo(Wire):
    """One stored image."""

    id: str  # the config blob digest, "sha256:..."
    manifest_digest: str
    names: list[str]  # normalised references that point at it
    layers: list[str]  # layer blob digests, base first
    size: int  # bytes of layer blobs
    created: str = ""
    architecture: str = ""
    os: str = ""
    is_wasm: bool = False
    runtime: Literal["oci", "wasm"] = "oci"  # which runtime runs it: crun, or wasmtime


class ImageDetail(Wire):
    """``InspectImage``: the image and its config."""

    image: ImageInfo
    config: ImageConfig
    history: list[dict[str, Any]] = Field(default_factory=list)


class ImageRootfs(Wire):
    """``EnsureImage``: what agentd needs to build a replica's root file system."""

    image: ImageInfo
    config: ImageConfig
    lower_dirs: list[str]  # unpacked layer directories, topmost first (overlayfs order)


# ---------------------------------------------------------------- overlayd


class Attachment(Wire):
    """A replica's network: its namespace, address and resolvers."""

    container_id: str
    netns: str  # path of the network namespace, for the OCI config
    interface: str  # name inside the namespace
    address: str  # the replica's IPv4 address
    prefix_len: int
    gateway: str
    dns: list[str]  # nameservers for the replica's resolv.conf
    search: list[str] = Field(default_factory=list)
    host_veth: str
    bridge: str


class NetworkInfo(Wire):
    bridge: str
    subnet: str  # "10.89.0.0/16"
    gateway: str
    allocations: int


# ---------------------------------------------------------------- agentd

ReplicaState = Literal[
    "creating", "initializing", "running", "exited", "restarting", "stopping", "stopped", "failed"
]
HealthState = Literal["none", "starting", "healthy", "unhealthy"]


class RevisionReplicas(Wire):
    """An older revision of a service that keeps ``replicas`` copies during a rollout."""

    revision: int
    spec: dict[str, Any]
    replicas: int


class ServiceAssignment(Wire):
    """schedd -> agentd: run ``replicas`` copies of this service at this revision.

    During a rollout ``previous`` names the older revisions that keep running
    (instances 1..replicas of each); every other revision's replicas go.
    """

    deployment: str
    service: str
    revision: int
    spec: dict[str, Any]  # ServiceSpec in JSON mode, with $E: references resolved
    replicas: int
    previous: list[RevisionReplicas] = Field(default_factory=list)
    # Bumped by every deploy: a replica waiting out a failed start's backoff
    # tries again at once when it changes (the user fixed the cause and redeployed).
    retry: int = 0
    # ``zlayerctl stop --timeout/--force``: the stop grace for replicas this
    # assignment removes, instead of the spec's stop_grace_period.
    grace: float | None = None


class NodeAssignments(Wire):
    """``SyncAssignments``: everything this node should run, from schedd.

    A complete view, never a delta: agentd replaces its assignments with
    these and removes the replicas of every service the view does not name.
    A view older than the one agentd holds (a lower ``generation``) is refused.
    """

    generation: int
    assignments: list[ServiceAssignment] = Field(default_factory=list)


class SyncResult(Wire):
    """The answer to a full-view sync (agentd's assignments, overlayd's and proxyd's traffic).

    ``generation`` is what the receiver holds after the call: the view's when
    ``accepted``, a newer one otherwise (the sender then moves past it).
    ``refusals`` maps a deployment to the sentence saying why its part of the
    view could not be applied; ``removed`` says what was removed because the
    view no longer names it, one sentence each, for schedd's events.
    """

    generation: int
    accepted: bool
    refusals: dict[str, str] = Field(default_factory=dict)
    removed: list[tuple[str, str]] = Field(default_factory=list)  # (deployment, sentence)


class ReplicaInfo(Wire):
    """One replica on this node, as agentd sees it."""

    id: str  # container id: <deployment>-<service>-<instance>-<revision>
    deployment: str
    service: str
    instance: int  # 1-based
    revision: int
    rtype: Literal["service", "job", "cron"] = "service"
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


class ReplicaStats(Wire):
    """A replica's resource use, read from its cgroup."""

    id: str
    cpu_usage_usec: int
    cpu_percent: float  # over the last sampling interval, 100 = one core
    memory_bytes: int
    memory_limit_bytes: int | None
    pids: int
    pids_limit: int | None


class JobRun(Wire):
    """One run of a job or cron service."""

    id: str
    deployment: str
    service: str
    trigger: Literal["manual", "schedule", "deploy"]
    state: Literal["running", "succeeded", "failed"]
    exit_code: int | None = None
    started_at: float
    finished_at: float | None = None
    message: str = ""


# ---------------------------------------------------------------- schedd


class ServiceStatus(Wire):
    name: str
    rtype: Literal["service", "job", "cron"]
    image: str
    desired: int
    running: int
    healthy: int
    state: Literal[
        "pending", "waiting", "starting", "updating", "running", "degraded", "failed", "stopped"
    ]
    message: str = ""
    stopping: int = 0  # replicas that were told to stop and have not ended yet
    revision: int = 0  # the revision whose replicas serve
    rollout: Literal["", "running", "failed"] = ""  # the last rollout, if it has not finished


class DeploymentStatus(Wire):
    name: str
    revision: int
    # "removing": `down` was asked and its replicas are still stopping.
    state: Literal["deploying", "running", "degraded", "failed", "stopped", "removing"]
    services: list[ServiceStatus]
    created_at: float
    updated_at: float
    message: str = ""


class DeployPlan(Wire):
    """``Plan``: what a deploy would do, nothing run."""

    deployment: str
    revision: int  # the revision a deploy would create
    actions: list[str]  # one sentence each: "create web: 3 replicas of zlayer/busybox:latest"


class Event(Wire):
    """Something that happened to a deployment, for `zlayerctl up` and status."""

    time: float
    deployment: str
    service: str = ""
    replica: str = ""
    kind: str  # "replica-started", "replica-exited", "health", "scaled", "deploy", ...
    message: str
