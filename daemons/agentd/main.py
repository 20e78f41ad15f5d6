"""Entry point and bus object of zlayer-agentd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError
from sdbus import dbus_method_async_override
from sdbus.dbus_exceptions import DbusNameHasNoOwnerError, DbusServiceUnknownError

from daemons.agentd.replicas import Node
from shared.bus import (
    DAEMONS_BY_NAME,
    Agent1,
    InvalidArgumentError,
    UnavailableError,
    proxy,
)
from shared.config import DaemonSettings
from shared.daemon import Daemon, daemon_members, main_for
from shared.paths import Paths
from shared.wire.agent import NodeAssignments, ReplicaInfo, ServiceAssignment
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

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    async def _call(self, daemon: str, call: Callable[[Any], Awaitable[T]]) -> T:
        info = DAEMONS_BY_NAME[daemon]
        deadline = time.monotonic() + NEIGHBOUR_WAIT
        while True:
            try:
                return await call(proxy(info, self.bus))
            except (DbusServiceUnknownError, DbusNameHasNoOwnerError):
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"{info.executable} has not been on the bus for {NEIGHBOUR_WAIT:.0f}s; "
                        "start it (`zlayerctl status` shows which daemons run)"
                    ) from None
                await asyncio.sleep(NEIGHBOUR_POLL)

    async def ensure_image(self, reference: str, pull_policy: str) -> ImageRootfs:
        text = await self._call("registryd", lambda r: r.ensure_image(reference, pull_policy))
        return ImageRootfs.model_validate_json(text)

    async def attach(self, container_id: str, hostname: str) -> Attachment:
        text = await self._call("overlayd", lambda o: o.attach(container_id, hostname))
        return Attachment.model_validate_json(text)

    async def detach(self, container_id: str) -> None:
        await self._call("overlayd", lambda o: o.detach(container_id))

    async def attached(self) -> list[str]:
        # Not waited for: garbage collection looks again at the next sync.
        overlay = proxy(DAEMONS_BY_NAME["overlayd"], self.bus)
        raw = await overlay.list_attachments()
        return [Attachment.model_validate(a).container_id for a in json.loads(raw)]


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
        node = await self._ready_node()
        await node.apply(ServiceAssignment.model_validate_json(assignment))

    @dbus_method_async_override()
    async def sync_assignments(self, assignments: str) -> str:
        try:
            view = NodeAssignments.model_validate_json(assignments)
        except ValidationError as exc:
            raise InvalidArgumentError(f"the assignments are not NodeAssignments: {exc}") from None
        node = await self._ready_node()
        return (await node.sync(view)).model_dump_json()

    @dbus_method_async_override()
    async def remove_service(
        self, deployment: str, service: str, timeout_sec: float, force: bool
    ) -> None:
        node = await self._ready_node()
        await node.remove_service(deployment, service, timeout_sec, force)

    @dbus_method_async_override()
    async def list_replicas(self, deployment: str, service: str) -> str:
        node = await self._ready_node()
        infos = node.infos(deployment, service)
        return json.dumps([r.model_dump(mode="json") for r in infos])

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
        stats = await self.daemon.runtime.stats(replica)
        return stats.model_dump_json()

    @dbus_method_async_override()
    async def run_job(self, deployment: str, service: str, trigger: str) -> str:
        node = await self._ready_node()
        return (await node.run_job(deployment, service, trigger)).model_dump_json()

    @dbus_method_async_override()
    async def list_job_runs(self, deployment: str, service: str) -> str:
        runs = self._node.job_runs(deployment, service)
        return json.dumps([r.model_dump(mode="json") for r in runs])


class AgentDaemon(Daemon):
    info = DAEMONS_BY_NAME["agentd"]
    holds_view = True

    def __init__(self, settings: DaemonSettings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.node_made = asyncio.Event()
        REPLICA_COLLECTOR.daemon = self

    def make_service(self) -> AgentService:
        self.service = AgentService(self)
        return self.service

    async def start(self) -> None:
        from daemons.agentd.launcher import RuntimeLauncher

        self.runtime = RuntimeLauncher(self.paths)
        await self.runtime.prepare()
        # EnsureImage may pull a large image; the bus default (25 s) would cut it short.
        if self.bus is not None:
            self.bus.method_call_timeout_usec = NEIGHBOUR_CALL_USEC
        self.node = Node(
            self.paths.daemon_state("agentd"), self.runtime, BusNeighbours(self.bus), self._changed
        )
        self.node_made.set()
        await self.node.load()

    def _changed(self, replica: ReplicaInfo) -> None:
        self.service.replica_changed.emit(replica.model_dump_json())

    async def stop(self) -> None:
        await self.node.shutdown()
        await self.runtime.close()


def main() -> None:
    main_for(AgentDaemon)
