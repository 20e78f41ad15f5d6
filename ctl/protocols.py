"""What zlayerctl's commands call on each daemon's client, as Protocols.

The bus clients (``shared.clients``) and the REST API's (``ctl.remote``) both
meet these, and the commands see only them through ``ctl.client.Client``, so
mypy checks that a command uses nothing the other kind of client lacks and
that both return the same types. A method a command starts to use is added
here, and mypy then asks both clients for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol

from shared.wire.agent import JobRun, ReplicaInfo
from shared.wire.api import TokenCreate, TokenInfo, TokenIssued
from shared.wire.daemon import DaemonStatus
from shared.wire.jobs import JobInfo
from shared.wire.overlay import NetworkInfo
from shared.wire.registry import BuildRequest, ImageDetail, ImageInfo, PruneResult
from shared.wire.scheduler import CronSchedule, Deployed, DeploymentStatus, DeployPlan, Event
from shared.wire.traffic import DnsRecord, RouteInfo, ServiceStats


class DaemonApi(Protocol):
    """What every daemon answers."""

    async def status(self) -> DaemonStatus: ...

    async def ping(self) -> None: ...


class JobsApi(DaemonApi, Protocol):
    """A daemon that runs jobs: their state, cancelling one, waiting for one's end."""

    async def get_job(self, job_id: int) -> JobInfo: ...

    async def cancel_job(self, job_id: int) -> None: ...

    async def run_job(
        self,
        start: Callable[[], Awaitable[int]],
        on_progress: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo: ...


class SchedulerApi(JobsApi, Protocol):
    async def deploy(
        self, spec_text: str, filename: str, host_env: Mapping[str, str]
    ) -> Deployed: ...

    async def plan(
        self, spec_text: str, filename: str, host_env: Mapping[str, str]
    ) -> DeployPlan: ...

    async def down(self, deployment: str) -> int: ...

    async def stop(self, deployment: str, service: str, timeout_sec: float, force: bool) -> int: ...

    async def scale(self, deployment: str, service: str, replicas: int) -> int: ...

    async def list_deployments(self) -> list[DeploymentStatus]: ...

    async def get_deployment(self, deployment: str) -> DeploymentStatus: ...

    async def trigger_job(self, deployment: str, service: str) -> JobRun: ...

    async def list_cron(self, deployment: str) -> list[CronSchedule]: ...

    async def rollback(self, deployment: str) -> int: ...

    async def list_events(self, deployment: str, limit: int) -> list[Event]: ...

    def events(self) -> AsyncIterator[Event]: ...


class AgentApi(DaemonApi, Protocol):
    async def list_replicas(self, deployment: str = "", service: str = "") -> list[ReplicaInfo]: ...

    async def log_paths(self, replica: str) -> list[str]: ...

    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int: ...

    async def list_job_runs(self, deployment: str, service: str) -> list[JobRun]: ...


class PathsApi(Protocol):
    """How a local path reaches registryd (``ctl.transfer``): seen by it, or sent to it."""

    async def path_visible(self, path: str, device: int, inode: int) -> bool: ...

    async def receive(self, fd: int) -> str: ...


class RegistryApi(JobsApi, PathsApi, Protocol):
    async def import_image(self, path: str, name: str) -> ImageInfo: ...

    async def list_images(self) -> list[ImageInfo]: ...

    async def inspect_image(self, reference: str) -> ImageDetail: ...

    async def remove_image(self, reference: str, force: bool) -> list[str]: ...

    async def pull(self, reference: str, pull_policy: str, auth: str) -> int: ...

    async def push(self, reference: str, destination: str, auth: str) -> int: ...

    async def login(self, registry: str, username: str, password: str) -> str: ...

    async def logout(self, registry: str) -> bool: ...

    async def prune(self) -> PruneResult: ...

    async def export_image(self, reference: str, fd: int, gzip: bool) -> int: ...

    async def build(self, request: BuildRequest) -> int: ...

    async def push_wasm(self, path: str, reference: str, auth: str, tls_verify: bool) -> int: ...


class OverlayApi(DaemonApi, Protocol):
    async def get_network(self) -> NetworkInfo: ...

    async def list_records(self) -> list[DnsRecord]: ...


class ProxyApi(DaemonApi, Protocol):
    async def list_routes(self) -> list[RouteInfo]: ...

    async def service_stats(self) -> list[ServiceStats]: ...


class TokensApi(Protocol):
    """The REST API's tokens: apid's Api1 on the node, ``/tokens`` through the API."""

    async def create_token(self, request: TokenCreate) -> TokenIssued: ...

    async def list_tokens(self) -> list[TokenInfo]: ...

    async def revoke_token(self, name: str) -> TokenInfo: ...
