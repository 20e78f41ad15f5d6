"""Entry point and bus object of zlayer-agentd."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from sdbus import dbus_method_async_override

from daemons.agentd.replicas import Node
from shared.bus import DAEMONS_BY_NAME, Agent1, proxy
from shared.daemon import Daemon, daemon_members, main_for
from shared.models import Attachment, ImageRootfs, ReplicaInfo, ServiceAssignment

NEIGHBOUR_CALL_USEC = 30 * 60 * 1_000_000


class BusNeighbours:
    """registryd and overlayd, reached over the bus."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    async def ensure_image(self, reference: str, pull_policy: str) -> ImageRootfs:
        registry = proxy(DAEMONS_BY_NAME["registryd"], self.bus)
        return ImageRootfs.model_validate_json(await registry.ensure_image(reference, pull_policy))

    async def attach(self, container_id: str, hostname: str) -> Attachment:
        overlay = proxy(DAEMONS_BY_NAME["overlayd"], self.bus)
        return Attachment.model_validate_json(await overlay.attach(container_id, hostname))

    async def detach(self, container_id: str) -> None:
        overlay = proxy(DAEMONS_BY_NAME["overlayd"], self.bus)
        await overlay.detach(container_id)


class AgentService(Agent1):
    version, status = daemon_members()

    def __init__(self, daemon: AgentDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    @property
    def _node(self) -> Node:
        return self.daemon.node

    @dbus_method_async_override()
    async def apply_service(self, assignment: str) -> None:
        await self._node.apply(ServiceAssignment.model_validate_json(assignment))

    @dbus_method_async_override()
    async def remove_service(
        self, deployment: str, service: str, timeout_sec: float, force: bool
    ) -> None:
        await self._node.remove_service(deployment, service, timeout_sec, force)

    @dbus_method_async_override()
    async def list_replicas(self, deployment: str, service: str) -> str:
        infos = self._node.infos(deployment, service)
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
        return (await self._node.run_job(deployment, service, trigger)).model_dump_json()

    @dbus_method_async_override()
    async def list_job_runs(self, deployment: str, service: str) -> str:
        runs = self._node.job_runs(deployment, service)
        return json.dumps([r.model_dump(mode="json") for r in runs])


class AgentDaemon(Daemon):
    info = DAEMONS_BY_NAME["agentd"]

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
        await self.node.load()

    def _changed(self, replica: ReplicaInfo) -> None:
        self.service.replica_changed.emit(replica.model_dump_json())

    async def stop(self) -> None:
        await self.node.shutdown()
        await self.runtime.close()


def main() -> None:
    main_for(AgentDaemon)
