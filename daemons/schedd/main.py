"""Entry point and bus object of zlayer-schedd."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from sdbus import dbus_method_async_override

from daemons.schedd.backend import SchedSettings, open_store
from daemons.schedd.scheduler import Scheduler, check_spec_size
from daemons.schedd.store import DesiredStore, Store
from shared.bus import DAEMONS_BY_NAME, Scheduler1, UnavailableError
from shared.config import DaemonSettings
from shared.daemon import Daemon, daemon_members, main_for
from shared.jobs import JobTable
from shared.paths import Paths
from shared.tasks import cancel_and_wait
from shared.wire import encode
from shared.wire.jobs import JobInfo
from shared.wire.scheduler import Deployed, Event

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemons.schedd.cluster import ClusterContext, NodeControl
    from shared.cluster.config import ClusterConfig

OUTBOUND_CALL_USEC = 30 * 60 * 1_000_000


def load_cluster_config(paths: Paths) -> ClusterConfig | None:
    """cluster.toml; a bad one stops schedd with its sentence. Here, not in
    :mod:`daemons.schedd.cluster`, which a lone node does not load."""
    from shared.cluster import config as cluster_config

    try:
        return cluster_config.load(paths)
    except cluster_config.ClusterConfigError as exc:
        raise UnavailableError(str(exc)) from None


class SchedulerService(Scheduler1):
    version, status = daemon_members()

    def __init__(self, daemon: SchedulerDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    @property
    def _scheduler(self) -> Scheduler:
        scheduler: Scheduler | None = getattr(self.daemon, "scheduler", None)
        if scheduler is None:  # in a cluster, start() waits for etcd with the name held
            raise UnavailableError("schedd is starting (it waits for etcd); try again shortly")
        return scheduler

    @dbus_method_async_override()
    async def deploy(self, spec_text: str, filename: str, host_env: dict[str, str]) -> str:
        status = await self._scheduler.deploy(spec_text, filename, host_env)
        name, revision = status.name, status.revision
        job_id = self.daemon.jobs.start(
            "deploy", name, lambda job: self._scheduler.converged(name, revision, job)
        )
        return encode(Deployed(status=status, job=job_id))

    @dbus_method_async_override()
    async def plan(self, spec_text: str, filename: str, host_env: dict[str, str]) -> str:
        return encode(await self._scheduler.plan(spec_text, filename, host_env))

    @dbus_method_async_override()
    async def validate(self, spec_text: str, filename: str, host_env: dict[str, str]) -> str:
        def check() -> str:
            check_spec_size(spec_text)  # refused before parsing, as Deploy's
            from shared.spec.check import check_spec

            # bytes, as zlayerctl reads the file: the same problems at the same places
            return encode(check_spec(spec_text.encode(), filename or "<spec>"))

        # in a worker thread, as Deploy's parse: the loop keeps answering meanwhile
        return await asyncio.to_thread(check)

    @dbus_method_async_override()
    async def down(self, deployment: str) -> int:
        await self._scheduler.down(deployment)
        return self.daemon.jobs.start(
            "down", deployment, lambda job: self._scheduler.removed(deployment, job)
        )

    @dbus_method_async_override()
    async def stop(self, deployment: str, service: str, timeout_sec: float, force: bool) -> int:
        await self._scheduler.stop(deployment, service, timeout_sec, force)
        services = {service} if service else None
        return self.daemon.jobs.start(
            "stop",
            deployment,
            lambda job: self._scheduler.settled(deployment, services, 0, job),
        )

    @dbus_method_async_override()
    async def scale(self, deployment: str, service: str, replicas: int) -> int:
        await self._scheduler.scale(deployment, service, replicas)
        return self.daemon.jobs.start(
            "scale",
            deployment,
            lambda job: self._scheduler.settled(deployment, {service}, replicas, job),
        )

    @dbus_method_async_override()
    async def list_deployments(self) -> str:
        return encode(await self._scheduler.list_status())

    @dbus_method_async_override()
    async def get_deployment(self, deployment: str) -> str:
        return encode(await self._scheduler.status(deployment))

    @dbus_method_async_override()
    async def get_spec(self, deployment: str) -> str:
        return await self._scheduler.spec_text(deployment)

    @dbus_method_async_override()
    async def trigger_job(self, deployment: str, service: str) -> str:
        return encode(await self._scheduler.trigger_job(deployment, service))

    @dbus_method_async_override()
    async def list_cron(self, deployment: str) -> str:
        return encode(await self._scheduler.cron_schedules(deployment))

    @dbus_method_async_override()
    async def rollback(self, deployment: str) -> int:
        return await self._scheduler.rollback(deployment)

    @dbus_method_async_override()
    async def resync(self, daemon: str) -> None:
        self._scheduler.resync(daemon)

    @dbus_method_async_override()
    async def list_events(self, deployment: str, limit: int) -> str:
        return encode(await self._scheduler.events(deployment, limit or 50))

    @dbus_method_async_override()
    async def list_replicas(self, deployment: str) -> str:
        return encode(await self._scheduler.cluster_replicas(deployment))

    # --- secrets (root only) and cron switches

    @dbus_method_async_override()
    async def set_secret(self, name: str, deployment: str, value: str) -> str:
        return encode(await self._scheduler.set_secret(name, deployment, value))

    @dbus_method_async_override()
    async def list_secrets(self) -> str:
        return encode(await self._scheduler.list_secrets())

    @dbus_method_async_override()
    async def get_secret(self, name: str, deployment: str) -> str:
        return encode(await self._scheduler.get_secret(name, deployment))

    @dbus_method_async_override()
    async def remove_secret(self, name: str, deployment: str) -> None:
        await self._scheduler.remove_secret(name, deployment)

    @dbus_method_async_override()
    async def set_cron_enabled(self, deployment: str, service: str, enabled: bool) -> None:
        await self._scheduler.set_cron_enabled(deployment, service, enabled)

    # --- the cluster (daemons/schedd/cluster.py)

    @dbus_method_async_override()
    async def node_init(self, advertise: str) -> str:
        return encode(await self.daemon.nodes.init(advertise))

    @dbus_method_async_override()
    async def node_join_token(self, ttl_sec: float) -> str:
        return await self.daemon.nodes.join_token(ttl_sec)

    @dbus_method_async_override()
    async def node_join(self, token: str, advertise: str) -> str:
        return encode(await self.daemon.nodes.join(token, advertise))

    @dbus_method_async_override()
    async def list_nodes(self) -> str:
        if getattr(self.daemon, "cluster", None) is None:  # (set as start() begins)
            # answered without NodeControl: every logs and exec asks this first, and a
            # lone node's schedd is not to load the cluster's code for it
            from shared.cluster.config import why_no_cluster

            raise await asyncio.to_thread(why_no_cluster, self.daemon.paths)
        return encode(await self.daemon.nodes.list_nodes())

    @dbus_method_async_override()
    async def label_node(self, node: str, labels: dict[str, str], remove: list[str]) -> str:
        return encode(await self.daemon.nodes.label(node, labels, remove))

    @dbus_method_async_override()
    async def drain_node(self, node: str) -> str:
        return encode(await self.daemon.nodes.drain(node))

    @dbus_method_async_override()
    async def undrain_node(self, node: str) -> str:
        return encode(await self.daemon.nodes.undrain(node))

    @dbus_method_async_override()
    async def remove_node(self, node: str) -> None:
        await self.daemon.nodes.remove(node)

    @dbus_method_async_override()
    async def rotate_mesh_key(self) -> str:
        return encode(await self.daemon.nodes.rotate_mesh_key())

    # --- jobs (shared/jobs.py): deploy, down, stop and scale wait for their deployment

    @dbus_method_async_override()
    async def get_job(self, job_id: int) -> str:
        return encode(self.daemon.jobs.require(job_id, "zlayer-schedd"))

    @dbus_method_async_override()
    async def cancel_job(self, job_id: int) -> None:
        self.daemon.jobs.cancel_running(job_id)


class SchedulerDaemon(Daemon):
    info = DAEMONS_BY_NAME["schedd"]
    settings_class = SchedSettings

    def __init__(self, settings: DaemonSettings, paths: Paths) -> None:
        super().__init__(settings, paths)
        # Deploy, down, stop and scale jobs: they wait in memory only; a restart forgets them.
        self.jobs = JobTable(self._job_removed, self._job_new)

    def make_service(self) -> SchedulerService:
        self.service = SchedulerService(self)
        if self.bus is not None:
            self.jobs.attach(self.bus, self.info.object_path)
        return self.service

    def _job_new(self, info: JobInfo, path: str) -> None:
        if path:
            self.service.job_new.emit((info.id, path, info.kind))

    def _job_removed(self, info: JobInfo, path: str) -> None:
        # JobRemoved's path is an object path: "/" when the job was never exported.
        self.service.job_removed.emit((info.id, path or "/", encode(info)))

    @functools.cached_property
    def nodes(self) -> NodeControl:
        """The node commands (init, join, ls, rm, ...), loaded at the first: a lone node
        that is given none never loads gRPC, etcd's client and the PKI (~30 MB)."""
        from daemons.schedd.cluster import NodeControl

        return NodeControl(self.paths, self)

    async def start(self) -> None:
        # Every call schedd makes carries its own asyncio timeout (a down waits for
        # each replica's stop grace); the bus's 25 s default would cut those short.
        assert self.bus is not None  # start() runs once the bus is open
        self.bus.method_call_timeout_usec = OUTBOUND_CALL_USEC
        assert isinstance(self.settings, SchedSettings)
        self.cluster: ClusterContext | None = None
        self.sqlite: Store | None = None
        config = load_cluster_config(self.paths)  # small: read before anything is served
        if config is not None:  # cluster.toml: etcd, this node's record, its peer server
            from daemons.schedd.cluster import ClusterContext

            self.cluster = await ClusterContext.open(config, self.paths)
            self.store: DesiredStore = self.cluster.store
        else:  # SQLite on a lone node; etcd when the [cluster] section names endpoints.
            self.store = open_store(
                self.settings.cluster, self.paths.daemon_state("schedd") / "state.db"
            )
            self.sqlite = self.store if isinstance(self.store, Store) else None
        self._run_scheduler()

    def _run_scheduler(self) -> None:
        assert self.bus is not None  # start() runs once the bus is open
        cluster_key: Callable[[], bytes] | None = None
        if self.cluster is not None:
            # in a cluster, secrets are sealed with the key every node of it holds
            from shared.cluster import secretkey

            cluster_key = functools.partial(secretkey.load, self.cluster.files)
        self.scheduler = Scheduler(self.store, self.bus, self._emit, self._secrets_key, cluster_key)
        self.scheduler.cluster = self.cluster
        if self.cluster is not None:
            self.cluster.on_removed = self.leave
        # The replica signals first: they keep the scheduler's copy of the replica
        # list current, and wake it at once so traffic follows health closely.
        self._watch_task = asyncio.create_task(
            self.scheduler.replica_cache.watch(), name="watch-replicas"
        )
        self._loop_task = asyncio.create_task(self.scheduler.run(), name="reconcile")

    async def pause(self) -> None:
        """Stop the reconcile loop (node init and join change the store under it)."""
        for task in (self._watch_task, self._loop_task):
            await cancel_and_wait(task)
        # The writes it posted (events) reach the store before the store changes or closes.
        await self.scheduler.io.drain()

    async def resume(self, cluster: ClusterContext | None) -> None:
        """Run the loop again: over the cluster's store once this node joined one."""
        if cluster is not None:
            if self.sqlite is not None:
                self.sqlite.close()
                self.sqlite = None
            self.cluster, self.store = cluster, cluster.store
        self._run_scheduler()

    async def leave(self) -> None:
        """Removed from its cluster (node rm elsewhere): lone again, over a new SQLite
        store; the one from before the cluster is kept aside, as its state went on in etcd."""
        from daemons.schedd.cluster import set_aside

        await self.pause()
        if self.cluster is not None:
            await self.cluster.close()
            self.cluster = None
        path = self.paths.daemon_state("schedd") / "state.db"
        await asyncio.to_thread(set_aside, path)
        self.store = self.sqlite = await asyncio.to_thread(Store, path)
        self._run_scheduler()

    def _secrets_key(self) -> bytes:
        """The key secrets are sealed with, read at their first use (not at start)."""
        from shared.nodekey import NodeKey, NodeKeyError

        try:
            return NodeKey.load(self.paths).secrets_key()
        except (NodeKeyError, OSError) as exc:
            raise UnavailableError(f"schedd cannot read the node key: {exc}") from None

    def _emit(self, event: Event) -> None:
        self.service.event_emitted.emit(encode(event))

    async def stop(self) -> None:
        await self.jobs.close()
        await self.pause()
        if self.cluster is not None:
            await self.cluster.close()  # leaves: its record and leadership go at once
        else:
            await asyncio.to_thread(self.store.close)


def main() -> None:
    main_for(SchedulerDaemon)
