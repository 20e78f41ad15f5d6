"""Typed clients of the six daemons' bus interfaces, for zlayerctl and the daemons alike.

Each client wraps an sdbus proxy of its interface (``shared.bus``) and
speaks the typed wire (``shared.wire``): arguments are Structs or plain
values, replies come back decoded into their Structs, so a type checker
checks every call end to end. Bus errors arrive as the ``ZLayerError``
subclasses of ``shared.bus``; a reply that does not decode raises
``shared.wire.WireError`` (a daemon of another version).

    bus = open_bus(resolve_bus_address(paths))
    deployments = await SchedulerClient(bus).list_deployments()
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from sdbus import SdBus
from sdbus.sd_bus_internals import SdBusMessage

from shared.bus import (
    DAEMONS_BY_NAME,
    Agent1,
    Api1,
    DaemonInfo,
    Job1,
    Overlay1,
    Proxy1,
    Registry1,
    Scheduler1,
)
from shared.wire import decode, encode
from shared.wire.agent import (
    JobRun,
    NodeAssignments,
    ReplicaInfo,
    ReplicaStats,
    ServiceAssignment,
    SyncResult,
)
from shared.wire.api import SecretInfo, SecretValue, TokenCreate, TokenInfo, TokenIssued
from shared.wire.daemon import DaemonStatus, StatusTuple
from shared.wire.jobs import JobInfo, ProgressItem
from shared.wire.mesh import MeshStatus
from shared.wire.overlay import Attachment, NetworkInfo
from shared.wire.registry import (
    BuildRequest,
    ImageDetail,
    ImageInfo,
    ImageRootfs,
    PruneResult,
)
from shared.wire.scheduler import (
    CronSchedule,
    Deployed,
    DeploymentStatus,
    DeployPlan,
    Event,
    SpecCheck,
)
from shared.wire.traffic import DeploymentTraffic, DnsRecord, RouteInfo, ServiceStats, TrafficViews

if TYPE_CHECKING:
    # loaded by the cluster calls themselves: a lone node's daemons never need them
    from shared.wire.cluster import NodeList, NodeRecord, NodeSettings


class DaemonInterface(Protocol):
    """What every daemon's interface in shared.bus declares and the base client calls."""

    async def status(self) -> StatusTuple: ...

    async def dbus_ping(self) -> None: ...


class JobsInterface(DaemonInterface, Protocol):
    """What the interface of a daemon that runs jobs (schedd, registryd) declares too."""

    async def get_job(self, job_id: int) -> str: ...

    async def cancel_job(self, job_id: int) -> None: ...

    # JobRemoved is not declared here: sdbus's signal descriptor, bound through a
    # Protocol, has no type mypy can check (jobs_removed says what it yields)


I = TypeVar("I", bound=DaemonInterface)  # noqa: E741  # the interface
J = TypeVar("J", bound=JobsInterface)  # the interface of a daemon that runs jobs

FALLBACK_SECONDS = 2.0  # run_job asks GetJob after this long without a signal


class DaemonClient(Generic[I]):
    """What every daemon answers; the base of each typed client."""

    def __init__(self, info: DaemonInfo, bus: SdBus) -> None:
        self.info = info
        self._bus = bus
        # The raw sdbus proxy: private, so every call from outside goes through a typed
        # method of this module (tests/unit/test_wire.py holds it so).
        self._proxy: I = info.interface.new_proxy(  # type: ignore[assignment]
            info.bus_name, info.object_path, bus
        )

    async def status(self) -> DaemonStatus:
        return DaemonStatus.from_dbus(await self._proxy.status())

    async def ping(self) -> None:
        """Return when the daemon's bus connection answers (org.freedesktop.DBus.Peer.Ping)."""
        await self._proxy.dbus_ping()


class JobClient:
    """One running job's Job1 object (shared/jobs.py): its info and Cancel."""

    def __init__(self, bus_name: str, path: str, bus: SdBus) -> None:
        self.path = path
        self._proxy = Job1.new_proxy(bus_name, path, bus)

    async def info(self) -> JobInfo:
        return decode(await self._proxy.get_info(), JobInfo)

    async def cancel(self) -> None:
        await self._proxy.cancel()


class JobsDaemonClient(DaemonClient[J]):
    """What a daemon that runs jobs (shared/jobs.py) answers: GetJob, CancelJob,
    JobRemoved, and waiting for a job's end."""

    async def get_job(self, job_id: int) -> JobInfo:
        reply = await self._proxy.get_job(job_id)
        return decode(reply, JobInfo)

    async def cancel_job(self, job_id: int) -> None:
        await self._proxy.cancel_job(job_id)

    async def jobs_removed(self) -> AsyncIterator[JobInfo]:
        """The final JobInfo of every job that ends from now on."""
        signal: AsyncIterator[tuple[int, str, str]] = self._proxy.job_removed  # type: ignore[attr-defined]
        async for _job_id, _path, text in signal:
            yield decode(text, JobInfo)

    def job(self, job_id: int) -> JobClient:
        """The Job1 object of a running job."""
        return JobClient(self.info.bus_name, f"{self.info.object_path}/job/{job_id}", self._bus)

    async def run_job(
        self,
        start: Callable[[], Awaitable[int]],
        on_progress: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """Start a job with ``start`` and wait for its end; its final JobInfo.

        Subscribes to JobRemoved before the job starts, so an end that comes
        at once is not missed, and follows the job's Progress property while
        it runs (``on_progress`` gets the JobInfo each time it changes).
        GetJob is asked only when no signal came for FALLBACK_SECONDS (a
        bus that dropped a signal); a daemon restarted meanwhile makes it
        raise NotFoundError. A failed job is returned, not raised: its
        ``error`` and ``error_name`` say why.
        """
        ended: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        removed_slot = await self._bus.match_signal_async(
            self.info.bus_name,
            self.info.object_path,
            self.info.bus_name,
            "JobRemoved",
            lambda message: ended.put_nowait(message.get_contents()),  # type: ignore[arg-type]
        )
        progress_slot = None
        try:
            job_id = await start()
            info = await self.get_job(job_id)
            if on_progress is not None and info.state == "running":
                job = self.job(job_id)

                def changed(message: SdBusMessage) -> None:
                    contents: tuple[str, dict[str, tuple[str, str]], list[str]]
                    contents = message.get_contents()  # type: ignore[assignment]
                    changed_values = contents[1]
                    if "Progress" in changed_values:
                        info.items = decode(changed_values["Progress"][1], list[ProgressItem])
                        on_progress(info)

                progress_slot = await self._bus.match_signal_async(
                    self.info.bus_name,
                    job.path,
                    "org.freedesktop.DBus.Properties",
                    "PropertiesChanged",
                    changed,
                )
                on_progress(await self.get_job(job_id))  # what happened before the match
            while info.state == "running":
                try:
                    ended_id, _path, text = await asyncio.wait_for(ended.get(), FALLBACK_SECONDS)
                except TimeoutError:
                    info = await self.get_job(job_id)
                    continue
                if ended_id == job_id:
                    info = decode(text, JobInfo)
            if on_progress is not None:
                on_progress(info)
            return info
        finally:
            removed_slot.close()
            if progress_slot is not None:
                progress_slot.close()


class SchedulerClient(JobsDaemonClient[Scheduler1]):
    """zlayer-schedd: desired state, rollouts, jobs and cron, events."""

    def __init__(self, bus: SdBus) -> None:
        super().__init__(DAEMONS_BY_NAME["schedd"], bus)

    async def deploy(self, spec_text: str, filename: str, host_env: Mapping[str, str]) -> Deployed:
        """The stored revision's status and the job that ends once it has converged."""
        reply = await self._proxy.deploy(spec_text, filename, dict(host_env))
        return decode(reply, Deployed)

    async def plan(self, spec_text: str, filename: str, host_env: Mapping[str, str]) -> DeployPlan:
        return decode(await self._proxy.plan(spec_text, filename, dict(host_env)), DeployPlan)

    async def validate(
        self, spec_text: str, filename: str, host_env: Mapping[str, str]
    ) -> SpecCheck:
        return decode(await self._proxy.validate(spec_text, filename, dict(host_env)), SpecCheck)

    async def down(self, deployment: str) -> int:
        """The id of the job that ends when the deployment is gone."""
        return await self._proxy.down(deployment)

    async def stop(self, deployment: str, service: str, timeout_sec: float, force: bool) -> int:
        """The id of the job that ends when the services' replicas have stopped."""
        return await self._proxy.stop(deployment, service, timeout_sec, force)

    async def scale(self, deployment: str, service: str, replicas: int) -> int:
        """The id of the job that ends when the service runs ``replicas`` at most."""
        return await self._proxy.scale(deployment, service, replicas)

    async def list_deployments(self) -> list[DeploymentStatus]:
        return decode(await self._proxy.list_deployments(), list[DeploymentStatus])

    async def get_deployment(self, deployment: str) -> DeploymentStatus:
        return decode(await self._proxy.get_deployment(deployment), DeploymentStatus)

    async def get_spec(self, deployment: str) -> str:
        return await self._proxy.get_spec(deployment)

    async def trigger_job(self, deployment: str, service: str) -> JobRun:
        return decode(await self._proxy.trigger_job(deployment, service), JobRun)

    async def list_cron(self, deployment: str) -> list[CronSchedule]:
        return decode(await self._proxy.list_cron(deployment), list[CronSchedule])

    async def rollback(self, deployment: str) -> int:
        return await self._proxy.rollback(deployment)

    async def list_events(self, deployment: str, limit: int) -> list[Event]:
        return decode(await self._proxy.list_events(deployment, limit), list[Event])

    async def resync(self, daemon: str) -> None:
        await self._proxy.resync(daemon)

    async def events(self) -> AsyncIterator[Event]:
        """Every Event schedd emits from now on."""
        async for text in self._proxy.event_emitted:
            yield decode(text, Event)

    async def set_secret(self, name: str, deployment: str, value: str) -> SecretInfo:
        return decode(await self._proxy.set_secret(name, deployment, value), SecretInfo)

    async def list_secrets(self) -> list[SecretInfo]:
        return decode(await self._proxy.list_secrets(), list[SecretInfo])

    async def get_secret(self, name: str, deployment: str) -> SecretValue:
        return decode(await self._proxy.get_secret(name, deployment), SecretValue)

    async def remove_secret(self, name: str, deployment: str) -> None:
        await self._proxy.remove_secret(name, deployment)

    async def set_cron_enabled(self, deployment: str, service: str, enabled: bool) -> None:
        await self._proxy.set_cron_enabled(deployment, service, enabled)

    async def cluster_replicas(self, deployment: str = "") -> list[ReplicaInfo]:
        """Every replica of ``deployment`` ("" for all) on every node of the cluster."""
        return decode(await self._proxy.list_replicas(deployment), list[ReplicaInfo])

    # --- this node in a cluster (root only)

    async def node_init(self, argument: str) -> NodeRecord:
        """Make this lone node a one-node cluster; ``argument`` is
        ``shared.cluster.blocks.init_argument``'s (the advertised address and options)."""
        from shared.wire.cluster import NodeRecord

        return decode(await self._proxy.node_init(argument), NodeRecord)

    async def node_join_token(self, ttl_sec: float) -> str:
        """A join token (one line) valid for ``ttl_sec`` seconds."""
        return await self._proxy.node_join_token(ttl_sec)

    async def node_join(self, token: str, advertise: str) -> NodeRecord:
        from shared.wire.cluster import NodeRecord

        return decode(await self._proxy.node_join(token, advertise), NodeRecord)

    async def list_nodes(self) -> NodeList:
        """The cluster's live nodes and its leader (InvalidArgumentError on a lone node)."""
        from shared.wire.cluster import NodeList

        return decode(await self._proxy.list_nodes(), NodeList)

    async def label_node(
        self, node: str, labels: Mapping[str, str], remove: list[str]
    ) -> NodeSettings:
        from shared.wire.cluster import NodeSettings

        return decode(await self._proxy.label_node(node, dict(labels), remove), NodeSettings)

    async def drain_node(self, node: str) -> NodeSettings:
        from shared.wire.cluster import NodeSettings

        return decode(await self._proxy.drain_node(node), NodeSettings)

    async def undrain_node(self, node: str) -> NodeSettings:
        from shared.wire.cluster import NodeSettings

        return decode(await self._proxy.undrain_node(node), NodeSettings)

    async def remove_node(self, node: str) -> None:
        await self._proxy.remove_node(node)

    async def rotate_mesh_key(self) -> NodeRecord:
        """A new mesh key pair for this node, published in its record."""
        from shared.wire.cluster import NodeRecord

        return decode(await self._proxy.rotate_mesh_key(), NodeRecord)


class AgentClient(DaemonClient[Agent1]):
    """zlayer-agentd: this node's replicas, job runs, logs, exec."""

    def __init__(self, bus: SdBus) -> None:
        super().__init__(DAEMONS_BY_NAME["agentd"], bus)

    async def apply_service(self, assignment: ServiceAssignment) -> None:
        await self._proxy.apply_service(encode(assignment))

    async def sync_assignments(self, assignments: NodeAssignments) -> SyncResult:
        return decode(await self._proxy.sync_assignments(encode(assignments)), SyncResult)

    async def remove_service(
        self, deployment: str, service: str, timeout_sec: float, force: bool
    ) -> None:
        await self._proxy.remove_service(deployment, service, timeout_sec, force)

    async def list_replicas(self, deployment: str = "", service: str = "") -> list[ReplicaInfo]:
        return decode(await self._proxy.list_replicas(deployment, service), list[ReplicaInfo])

    async def log_paths(self, replica: str) -> list[str]:
        return await self._proxy.log_paths(replica)

    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int:
        return await self._proxy.exec(replica, argv, tty, stdin, stdout, stderr)

    async def stats(self, replica: str) -> ReplicaStats:
        return decode(await self._proxy.stats(replica), ReplicaStats)

    async def run_job(self, deployment: str, service: str, trigger: str) -> JobRun:
        return decode(await self._proxy.run_job(deployment, service, trigger), JobRun)

    async def list_job_runs(self, deployment: str, service: str) -> list[JobRun]:
        return decode(await self._proxy.list_job_runs(deployment, service), list[JobRun])

    async def replica_changes(self) -> AsyncIterator[ReplicaInfo]:
        """Every replica whose state or health changes from now on."""
        async for text in self._proxy.replica_changed:
            yield decode(text, ReplicaInfo)


class RegistryClient(JobsDaemonClient[Registry1]):
    """zlayer-registryd: images, pulls and pushes, builds, jobs."""

    def __init__(self, bus: SdBus) -> None:
        super().__init__(DAEMONS_BY_NAME["registryd"], bus)

    async def import_image(self, path: str, name: str) -> ImageInfo:
        return decode(await self._proxy.import_image(path, name), ImageInfo)

    async def images_stored(self) -> AsyncIterator[ImageInfo]:
        """Every image registryd stores or names from now on (its ImageStored signal)."""
        async for text in self._proxy.image_stored:
            yield decode(text, ImageInfo)

    async def path_visible(self, path: str, device: int, inode: int) -> bool:
        return await self._proxy.path_visible(path, device, inode)

    async def receive(self, fd: int) -> str:
        return await self._proxy.receive(fd)

    async def list_images(self) -> list[ImageInfo]:
        return decode(await self._proxy.list_images(), list[ImageInfo])

    async def inspect_image(self, reference: str) -> ImageDetail:
        return decode(await self._proxy.inspect_image(reference), ImageDetail)

    async def remove_image(self, reference: str, force: bool) -> list[str]:
        return await self._proxy.remove_image(reference, force)

    async def ensure_image(self, reference: str, pull_policy: str) -> ImageRootfs:
        return decode(await self._proxy.ensure_image(reference, pull_policy), ImageRootfs)

    async def ensure_image_job(
        self,
        reference: str,
        pull_policy: str,
        on_progress: Callable[[JobInfo], None] | None = None,
    ) -> ImageRootfs:
        """EnsureImageJob: the ImageRootfs at once when no pull is needed, else when the
        pull job ends, waited for by its signal; a failed job raises its bus error."""
        from shared.bus import ERRORS, ZLayerError

        job_id, rootfs = await self._proxy.ensure_image_job(reference, pull_policy)
        if job_id:

            async def started() -> int:
                return job_id

            # run_job reads the job after subscribing: an end before that is not missed.
            info = await self.run_job(started, on_progress)
            if info.state != "done":
                error = next((e for e in ERRORS if e.dbus_error_name == info.error_name), None)
                raise (error or ZLayerError)(info.error or f"the pull of {reference} failed")
            rootfs = info.result
        return decode(rootfs, ImageRootfs)

    async def list_jobs(self) -> list[JobInfo]:
        return decode(await self._proxy.list_jobs(), list[JobInfo])

    async def pull(self, reference: str, pull_policy: str, auth: str) -> int:
        return await self._proxy.pull(reference, pull_policy, auth)

    async def push(self, reference: str, destination: str, auth: str) -> int:
        return await self._proxy.push(reference, destination, auth)

    async def login(self, registry: str, username: str, password: str) -> str:
        return await self._proxy.login(registry, username, password)

    async def logout(self, registry: str) -> bool:
        return await self._proxy.logout(registry)

    async def prune(self) -> PruneResult:
        return decode(await self._proxy.prune(), PruneResult)

    async def export_image(self, reference: str, fd: int, gzip: bool) -> int:
        return await self._proxy.export_image(reference, fd, gzip)

    async def build(self, request: BuildRequest) -> int:
        return await self._proxy.build(encode(request))

    async def push_wasm(self, path: str, reference: str, auth: str, tls_verify: bool) -> int:
        return await self._proxy.push_wasm(path, reference, auth, tls_verify)


class OverlayClient(DaemonClient[Overlay1]):
    """zlayer-overlayd: replica networks, service DNS, kernel-path ports."""

    def __init__(self, bus: SdBus) -> None:
        super().__init__(DAEMONS_BY_NAME["overlayd"], bus)

    async def attach(self, container_id: str, hostname: str) -> Attachment:
        return decode(await self._proxy.attach(container_id, hostname), Attachment)

    async def reserve(self, container_id: str, hostname: str) -> Attachment:
        return decode(await self._proxy.reserve(container_id, hostname), Attachment)

    async def detach(self, container_id: str) -> None:
        await self._proxy.detach(container_id)

    async def list_attachments(self) -> list[Attachment]:
        return decode(await self._proxy.list_attachments(), list[Attachment])

    async def get_network(self) -> NetworkInfo:
        return decode(await self._proxy.get_network(), NetworkInfo)

    async def sync_traffic(self, views: TrafficViews) -> SyncResult:
        return decode(await self._proxy.sync_traffic(encode(views)), SyncResult)

    async def set_traffic(self, deployment: str, traffic: DeploymentTraffic) -> None:
        await self._proxy.set_traffic(deployment, encode(traffic))

    async def list_records(self) -> list[DnsRecord]:
        return decode(await self._proxy.list_records(), list[DnsRecord])

    async def enable_mesh(self, listen_port: int) -> MeshStatus:
        return decode(await self._proxy.enable_mesh(listen_port), MeshStatus)

    async def get_mesh(self) -> MeshStatus:
        return decode(await self._proxy.get_mesh(), MeshStatus)

    async def rotate_mesh_key(self) -> MeshStatus:
        return decode(await self._proxy.rotate_mesh_key(), MeshStatus)


class ProxyClient(DaemonClient[Proxy1]):
    """zlayer-proxyd: L4/L7 routes and their counters."""

    def __init__(self, bus: SdBus) -> None:
        super().__init__(DAEMONS_BY_NAME["proxyd"], bus)

    async def sync_traffic(self, views: TrafficViews) -> SyncResult:
        return decode(await self._proxy.sync_traffic(encode(views)), SyncResult)

    async def set_traffic(self, deployment: str, traffic: DeploymentTraffic) -> None:
        await self._proxy.set_traffic(deployment, encode(traffic))

    async def list_routes(self) -> list[RouteInfo]:
        return decode(await self._proxy.list_routes(), list[RouteInfo])

    async def service_stats(self) -> list[ServiceStats]:
        return decode(await self._proxy.service_stats(), list[ServiceStats])


class ApiClient(DaemonClient[Api1]):
    """zlayer-apid: the REST gateway; on the bus, its tokens."""

    def __init__(self, bus: SdBus) -> None:
        super().__init__(DAEMONS_BY_NAME["apid"], bus)

    async def create_token(self, request: TokenCreate) -> TokenIssued:
        return decode(await self._proxy.create_token(encode(request)), TokenIssued)

    async def list_tokens(self) -> list[TokenInfo]:
        return decode(await self._proxy.list_tokens(), list[TokenInfo])

    async def revoke_token(self, name: str) -> TokenInfo:
        return decode(await self._proxy.revoke_token(name), TokenInfo)


def daemon_client(name: str, bus: SdBus) -> DaemonClient[DaemonInterface]:
    """A client of any daemon by short name, for what every daemon answers (status, ping)."""
    return DaemonClient(DAEMONS_BY_NAME[name], bus)
