"""schedd's values: deployments and their services' status, plans, events, cron schedules."""

from __future__ import annotations

from typing import Literal

from shared.wire import Wire
from shared.wire.agent import ReplicaType

ServiceState = Literal[
    "pending", "waiting", "starting", "updating", "running", "degraded", "failed", "stopped"
]
# "removing": `down` was asked and the deployment's replicas are still stopping.
DeploymentState = Literal["deploying", "running", "degraded", "failed", "stopped", "removing"]


class ServiceStatus(Wire, frozen=True):
    name: str
    rtype: ReplicaType
    image: str
    desired: int
    running: int
    healthy: int
    state: ServiceState
    message: str = ""
    stopping: int = 0  # replicas that were told to stop and have not ended yet
    revision: int = 0  # the revision whose replicas serve
    rollout: Literal["", "running", "failed"] = ""  # the last rollout, if it has not finished


class DeploymentStatus(Wire, frozen=True):
    name: str
    revision: int
    state: DeploymentState
    services: list[ServiceStatus]
    created_at: float
    updated_at: float
    message: str = ""


def replicas_over(status: DeploymentStatus, services: set[str] | None, target: int) -> int:
    """Replicas of the named services (every service for None) that still stop or run
    beyond ``target`` each: 0 once a stop or a scale-down to ``target`` is done."""
    return sum(
        s.stopping + max(0, s.running - target)
        for s in status.services
        if services is None or s.name in services
    )


class DeployPlan(Wire, frozen=True):
    """``Plan``: what a deploy would do, nothing run."""

    deployment: str
    revision: int  # the revision a deploy would create
    actions: list[str]  # one sentence each: "create web: 3 replicas of zlayer/busybox:latest"


class Event(Wire, frozen=True, kw_only=True):
    """Something that happened to a deployment, for `zlayerctl up` and status."""

    time: float
    deployment: str
    service: str = ""
    replica: str = ""
    kind: str  # "replica-started", "replica-exited", "health", "scaled", "deploy", ...
    message: str


class CronSchedule(Wire, frozen=True):
    """``ListCron``: one cron service's schedule and runs."""

    deployment: str
    service: str
    schedule: str
    next_run: float | None = None
    last_run: float | None = None
    enabled: bool = True  # False: SetCronEnabled turned it off; it does not fire


class Deployed(Wire, frozen=True):
    """``Deploy``: the stored revision's status, and the job that ends once it has
    converged (done with the final DeploymentStatus, or failed with the reason)."""

    status: DeploymentStatus
    job: int


class SpecProblem(Wire, frozen=True):
    """One problem in a spec file, as ``shared.spec.SpecIssue``; line and column count
    from 1 (0: about the whole file)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        # as SpecIssue's (the tests hold the two equal): shared.spec loads the spec models
        where = self.file
        if self.line:
            where += f":{self.line}:{self.column}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class EndpointSummary(Wire, frozen=True):
    name: str
    protocol: str
    port: int
    public: bool


class ServiceSummary(Wire, frozen=True):
    """One service of a valid spec, as ``zlayerctl validate`` lists it."""

    name: str
    rtype: str
    schedule: str  # a cron service's, else ""
    image: str
    endpoints: list[EndpointSummary]
    scale: str  # "fixed 3", "adaptive 1-5", "manual", or "-" for jobs and cron


class SpecCheck(Wire, frozen=True):
    """``Validate``: every problem of an invalid spec (``total`` counts those past the
    limit too), or what a valid one deploys and what this node refuses or warns about."""

    valid: bool
    problems: list[SpecProblem] = []
    total: int = 0
    deployment: str = ""
    services: list[ServiceSummary] = []
    refusals: list[str] = []
    warnings: list[str] = []
