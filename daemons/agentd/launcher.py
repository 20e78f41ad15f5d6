"""The replica lifecycle's view of the container runtime (``replicas.Launcher``).

Owns the small decisions between "start this replica" and
:class:`~daemons.agentd.runtime.ContainerRuntime`: where the runtime keeps its
files (agentd's state and run directories), the environment a container gets
(the spec's env, references already resolved by schedd), the hostname, the
host's resolv.conf for replicas on the host network, and the log rotation task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING

from daemons.agentd import cgroups
from daemons.agentd.bundle import ReplicaIds
from daemons.agentd.runtime import ContainerRuntime
from shared.paths import Paths
from shared.wire.agent import ReplicaStats
from shared.wire.overlay import Attachment
from shared.wire.registry import ImageRootfs

if TYPE_CHECKING:
    from shared.spec import ServiceSpec


HOST_RESOLV = Path("/etc/resolv.conf")
log = logging.getLogger("zlayer.agentd")


def replica_ids(container_id: str, spec: ServiceSpec) -> ReplicaIds:
    """Ids for labels; the hostname is the spec's, else the id without its revision."""
    base, sep, revision = container_id.rpartition("-r")
    name = base if sep and revision.isdigit() else container_id
    return ReplicaIds(container_id, hostname=spec.hostname or name)


def container_env(spec: ServiceSpec) -> dict[str, str]:
    """The spec's env as strings. schedd has already put each ``$S:`` secret's value
    in the assignment it sent, so nothing here is a reference any more."""
    return {name: str(value) for name, value in spec.env.items()}


class RuntimeLauncher:
    """``replicas.Launcher`` over conmon and crun."""

    def __init__(self, paths: Paths, cgroup_parent: str = cgroups.PARENT) -> None:
        self.runtime = ContainerRuntime(
            paths.daemon_state("agentd"), paths.run_dir / "agentd", cgroup_parent=cgroup_parent
        )
        self._rotation: asyncio.Task[None] | None = None

    async def prepare(self) -> None:
        await self.runtime.prepare()
        await self.runtime.adopt()
        if (self.runtime.state_dir / "wasm").is_dir():  # a node that never ran wasm skips it
            await asyncio.to_thread(self._prune_wasm_cache)
        self._rotation = asyncio.create_task(self.runtime.rotate_logs_forever())

    def _prune_wasm_cache(self) -> None:
        from daemons.agentd import wasm

        for path in wasm.prune_cache(self.runtime.state_dir):
            log.info("removed %s: no replica has used it for a week, or it was cut short", path)

    async def close(self) -> None:
        if self._rotation is not None:
            self._rotation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rotation

    async def start(
        self,
        container_id: str,
        service: ServiceSpec,
        rootfs: ImageRootfs,
        attachment: Attachment | None,
        args: list[str] | None,
        before_start: Awaitable[object] | None = None,
    ) -> int:
        host_resolv = ""
        if attachment is None:
            with contextlib.suppress(OSError):
                host_resolv = await asyncio.to_thread(HOST_RESOLV.read_text)
        return await self.runtime.run(
            container_id,
            service,
            rootfs,
            attachment,
            container_env(service),
            ids=replica_ids(container_id, service),
            args=args,
            host_resolv=host_resolv,
            before_start=before_start,
        )

    async def wait(self, container_id: str) -> tuple[int, bool]:
        status = await self.runtime.wait(container_id)
        return status.code, status.oom_killed

    async def running_pid(self, container_id: str) -> int | None:
        try:
            info = await self.runtime.state(container_id)
        except Exception:
            return None
        return info.pid if info.status == "running" and info.pid else None

    async def stop(self, container_id: str, signal: str, grace: float) -> None:
        if not self.runtime.bundle_dir(container_id).exists():
            return
        await self.runtime.stop(container_id, signal, grace)

    async def remove(self, container_id: str) -> None:
        await self.runtime.delete(container_id)

    async def exec(
        self, container_id: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int:
        return await self.runtime.exec(container_id, argv, tty, stdin, stdout, stderr)

    def log_paths(self, container_id: str) -> list[str]:
        return [str(p) for p in self.runtime.log_paths(container_id)]

    async def container_ids(self) -> list[str]:
        return [path.name for path in await asyncio.to_thread(self.runtime.bundle_dirs)]

    async def stats(self, container_id: str) -> ReplicaStats:
        return await self.runtime.stats(container_id)
