"""Entry point and bus object of zlayer-agentd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar, get_args

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sdbus import SdBus, dbus_method_async_override
from sdbus.dbus_exceptions import (
    DbusNameHasNoOwnerError,
    DbusServiceUnknownError,
    DbusUnknownMethodError,
)

from daemons.agentd.replicas import Node
from daemons.agentd.settings import AgentSettings
from shared.bus import DAEMONS_BY_NAME, Agent1, DaemonInfo, InvalidArgumentError, UnavailableError
from shared.clients import OverlayClient, RegistryClient
from shared.daemon import Daemon, daemon_members, main_for
from shared.paths import Paths
from shared.wire import WireError, decode, encode
from shared.wire.agent import JobTrigger, NodeAssignments, ReplicaInfo, ServiceAssignment
from shared.wire.jobs import JobInfo
from shared.wire.overlay import Attachment
from shared.wire.registry import ImageRootfs

NEIGHBOUR_CALL_USEC = 30 * 60 * 1_000_000
NEIGHBOUR_WAIT = 120.0  # how long a replica waits for registryd or overlayd to come up
NEIGHBOUR_POLL = 0.5

T = TypeVar("T")


class BusNeighbours:
    """registryd and overlayd, reached over the bus.

    A neighbour that is not on the bus yet (the daemons start together, or it
    is restarting) is waited for, up to ``NEIGHBOUR_WAIT``, instead of
    failing the replica that needs it.
    """

    def __init__(self, bus: SdBus) -> None:
        self.registry = RegistryClient(bus)
        self.overlay = OverlayClient(bus)

    async def _call(self, info: DaemonInfo, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + NEIGHBOUR_WAIT
        while True:
            try:
                return await call()
            except (DbusServiceUnknownError, DbusNameHasNoOwnerError):
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"{info.executable} has not been on the bus for {NEIGHBOUR_WAIT:.0f}s; "
                        "start it (`zlayerctl status` shows which daemons run)"
                    ) from None
                await asyncio.sleep(NEIGHBOUR_POLL)

    async def ensure_image(
        self,
        reference: str,
        pull_policy: str,
        on_progress: Callable[[str], None] | None = None,
    ) -> ImageRootfs:
        registry = self.registry

        def progress(job: JobInfo) -> None:
            if on_progress is not None and job.state == "running" and job.items:
                done = sum(item.state in ("done", "exists") for item in job.items)
                on_progress(f"pulling {reference}: {done} of {len(job.items)} layers")

        # A pull is a registryd job, waited for by its signal; an image already
        # here is answered in the call itself.
        return await self._call(
            registry.info, lambda: registry.ensure_image_job(reference, pull_policy, progress)
        )

    async def reserve(self, container_id: str, hostname: str) -> Attachment:
        overlay = self.overlay
        try:
            return await self._call(overlay.info, lambda: overlay.reserve(container_id, hostname))
        except DbusUnknownMethodError:
            # An overlayd from before Reserve (a node midway through an upgrade, agentd
            # restarted first): Attach makes the whole network now, and the Attach that
            # follows finds it made.
            return await self.attach(container_id, hostname)

    async def attach(self, container_id: str, hostname: str) -> Attachment:
        overlay = self.overlay
        return await self._call(overlay.info, lambda: overlay.attach(container_id, hostname))

    async def detach(self, container_id: str) -> None:
        overlay = self.overlay
        await self._call(overlay.info, lambda: overlay.detach(container_id))

    async def attached(self) -> list[str]:
        # Not waited for: garbage collection looks again at the next sync.
        return [a.container_id for a in await self.overlay.list_attachments()]


class ReplicaCollector(Collector):
    """Replicas on this node by service and state, read at scrape time."""

    daemon: AgentDaemon | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "zlayer_agent_replicas",
            "Replicas on this node by deployment, service and state.",
            labels=["deployment", "service", "state"],
        )
        healthy = GaugeMetricFamily(
            "zlayer_agent_replicas_healthy",
            "Running replicas in rotation (healthy, or with no health check).",
            labels=["deployment", "service"],
        )
        node = self.daemon.node if self.daemon and self.daemon.node_made.is_set() else None
        counts: Counter[tuple[str, str, str]] = Counter()
        in_rotation: Counter[tuple[str, str]] = Counter()
        for replica in list(node.replicas.values()) if node is not None else []:
            record = replica.record
            counts[(record.deployment, record.service, record.state)] += 1
            if record.state == "running" and record.health in ("healthy", "none"):
                in_rotation[(record.deployment, record.service)] += 1
        for labels, count in sorted(counts.items()):
            family.add_metric(list(labels), count)
        for key, count in sorted(in_rotation.items()):
            healthy.add_metric(list(key), count)
        yield family
        yield healthy


REPLICA_COLLECTOR = ReplicaCollector()
REGISTRY.register(REPLICA_COLLECTOR)


class AgentService(Agent1):
    version, status = daemon_members()

    def __init__(self, daemon: AgentDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    @property
    def _node(self) -> Node:
        if not self.daemon.node_made.is_set():
            raise UnavailableError("zlayer-agentd is starting; try again in a moment")
        return self.daemon.node

    async def _ready_node(self) -> Node:
        """The node once it has adopted what runs: nothing is answered from half a picture."""
        await self.daemon.node_made.wait()
        node = self.daemon.node
        await node.loaded.wait()
        return node

    @dbus_method_async_override()
    async def apply_service(self, assignment: str) -> None:
        try:
            wanted = decode(assignment, ServiceAssignment)
        except WireError as exc:
            raise InvalidArgumentError(f"the assignment is {exc}") from None
        node = await self._ready_node()
        await node.apply(wanted)

    @dbus_method_async_override()
    async def sync_assignments(self, assignments: str) -> str:
        try:
            view = decode(assignments, NodeAssignments)
        except WireError as exc:
            raise InvalidArgumentError(f"the assignments are {exc}") from None
        node = await self._ready_node()
        return encode(await node.sync(view))

    @dbus_method_async_override()
    async def remove_service(
        self, deployment: str, service: str, timeout_sec: float, force: bool
    ) -> None:
        node = await self._ready_node()
        await node.remove_service(deployment, service, timeout_sec, force)

    @dbus_method_async_override()
    async def list_replicas(self, deployment: str, service: str) -> str:
        node = await self._ready_node()
        return encode(node.infos(deployment, service))

    @dbus_method_async_override()
    async def log_paths(self, replica: str) -> list[str]:
        return self._node.log_paths(replica)

    @dbus_method_async_override()
    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int:
        self._node.find(replica)
        try:
            return await self._node.launcher.exec(replica, argv, tty, stdin, stdout, stderr)
        finally:
            # The descriptors are ours once received: a caller waiting for EOF on
            # its stdout would hang while agentd still held a copy.
            for fd in {stdin, stdout, stderr}:
                with contextlib.suppress(OSError):
                    os.close(fd)

    @dbus_method_async_override()
    async def stats(self, replica: str) -> str:
        self._node.find(replica)
        return encode(await self.daemon.runtime.stats(replica))

    @dbus_method_async_override()
    async def run_job(self, deployment: str, service: str, trigger: str) -> str:
        node = await self._ready_node()
        return encode(await node.run_job(deployment, service, _job_trigger(trigger)))

    @dbus_method_async_override()
    async def list_job_runs(self, deployment: str, service: str) -> str:
        node = await self._ready_node()  # the runs are read as it loads
        return encode(node.job_runs(deployment, service))


def _job_trigger(text: str) -> JobTrigger:
    """A job run's trigger as the bus gave it, or InvalidArgument."""
    triggers: tuple[JobTrigger, ...] = get_args(JobTrigger)
    for trigger in triggers:
        if text == trigger:
            return trigger
    raise InvalidArgumentError(f"a job run's trigger is {' or '.join(triggers)}, not {text!r}")


class AgentDaemon(Daemon):
    info = DAEMONS_BY_NAME["agentd"]
    settings_class = AgentSettings
    settings: AgentSettings
    holds_view = True

    def __init__(self, settings: AgentSettings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.node_made = asyncio.Event()
        REPLICA_COLLECTOR.daemon = self

    def make_service(self) -> AgentService:
        self.service = AgentService(self)
        return self.service

    async def start(self) -> None:
        from daemons.agentd.launcher import RuntimeLauncher

        self.runtime = RuntimeLauncher(self.paths, self.settings.cgroup_parent)
        await self.runtime.prepare()
        bus = self.bus
        assert bus is not None  # run() connects before start()
        # EnsureImage may pull a large image; the bus default (25 s) would cut it short.
        bus.method_call_timeout_usec = NEIGHBOUR_CALL_USEC
        from shared.cluster.config import path_of as cluster_config_path

        in_cluster = await asyncio.to_thread(cluster_config_path(self.paths).exists)
        self.node = Node(
            self.paths.daemon_state("agentd"),
            self.runtime,
            BusNeighbours(bus),
            self._changed,
            in_cluster=in_cluster,
        )
        self.node_made.set()
        await self.node.load()
        # WebAssembly images compile as they arrive, not at their first replica's start.
        from daemons.agentd.wasm_precompile import Precompiler

        self.precompiler = Precompiler(self.paths.daemon_state("agentd"), RegistryClient(bus))
        self.precompiler.start()

    def _changed(self, replica: ReplicaInfo) -> None:
        self.service.replica_changed.emit(encode(replica))

    async def stop(self) -> None:
        await self.precompiler.close()
        await self.node.shutdown()
        await self.runtime.close()


def main() -> None:
    main_for(AgentDaemon)
