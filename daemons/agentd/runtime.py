"""The container lifecycle of zlayer-agentd, through conmon and crun (runc as fallback).

Owns a container's life between "run this replica" and its removal: create
(the bundle, its overlayfs root at ``<bundle>/rootfs``, conmon, which
double-forks so containers outlive agentd and writes the k8s-file log and the
exit code), start, state and exit status (with the OOM verdict read before the
cgroup goes), stop with a grace period, exec with the caller's descriptors,
stats, delete, log rotation, and adoption of the containers a previous agentd
left running.

Directories (``state_dir`` persists, ``run_dir`` is volatile)::

    state_dir/bundles/<id>/   config.json rootfs/ upper/ work/ ctr.log* meta.json exit.json
    state_dir/volumes/<name>/ named volumes, kept across replicas and redeploys
    run_dir/crun/ (or runc/)  the OCI runtime's --root
    run_dir/exits/<id>        conmon's exit files
    run_dir/sock/             conmon's attach sockets

The pieces live beside it: the bundle's config in :mod:`daemons.agentd.bundle`,
its files and overlayfs root in :mod:`daemons.agentd.bundle_files`, conmon and the
OCI runtime as processes in :mod:`daemons.agentd.oci`, the logs in
:mod:`daemons.agentd.logs` and cgroup reads in :mod:`daemons.agentd.cgroups`.
:class:`ContainerRuntime` holds them together and is what the rest of agentd uses.

Every failure is a :class:`~daemons.agentd.errors.ContainerError` whose
message is one sentence, never the runtime's stderr alone.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from daemons.agentd import bundle_files, cgroups, logs, oci
from daemons.agentd.bundle import HostFacts, ReplicaIds, build_bundle
from daemons.agentd.errors import (
    BundleError,
    CgroupError,
    ContainerError,
    ContainerNotFound,
    SpecRefused,
)
from shared.statefile import write_atomically
from shared.tasks import ended_before_cancel
from shared.wire.agent import ReplicaStats
from shared.wire.overlay import Attachment
from shared.wire.registry import ImageRootfs

if TYPE_CHECKING:
    from shared.spec import ServiceSpec

log = logging.getLogger("zlayer.agentd.runtime")

EXIT = "exit.json"
KILL_TIMEOUT = 10.0

ContainerStatus = Literal["created", "running", "paused", "stopped"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ExitStatus:
    """How a container ended."""

    code: int
    oom_killed: bool


@dataclass(frozen=True)
class ContainerInfo:
    """One container as this node sees it."""

    id: str
    status: ContainerStatus
    pid: int  # the container's PID 1 on the host, 0 when not running
    conmon_pid: int  # 0 when conmon is gone
    bundle: Path
    exit: ExitStatus | None  # set once the container has ended


class ContainerRuntime:
    """Containers on this node, driven through conmon and crun (or runc)."""

    def __init__(
        self,
        state_dir: Path,
        run_dir: Path,
        *,
        runtime_path: str | None = None,
        conmon_path: str | None = None,
        manager: cgroups.CgroupManager | None = None,
        syslog: bool | None = None,
        log_size_max: int = 10 * 1024 * 1024,
        log_files_kept: int = 3,
        cgroup_root: Path = cgroups.CGROUP_ROOT,
        cgroup_parent: str = cgroups.PARENT,
    ) -> None:
        # Absolute: conmon runs in the bundle, and gets these paths as arguments.
        state_dir = state_dir.absolute()
        run_dir = run_dir.absolute()
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.bundles_dir = state_dir / "bundles"
        self.volumes_dir = state_dir / "volumes"
        self.exit_dir = run_dir / "exits"
        self.socket_dir = run_dir / "sock"
        self.runtime_path = runtime_path or ""
        self.conmon_path = conmon_path or ""
        self.manager: cgroups.CgroupManager = manager or cgroups.cgroup_manager()
        self.syslog = self.manager == "systemd" if syslog is None else syslog
        # A session keyring per container, as Docker gives; off once the node refuses
        # keyctl (inside a container such as systemd-nspawn, whose filter blocks it).
        self.new_keyring = True
        self.log_size_max = log_size_max
        self.log_files_kept = log_files_kept
        self.cgroup_root = cgroup_root
        # Where replicas whose spec names no cgroup_parent go (agentd's setting).
        self.cgroup_parent = cgroup_parent
        self.layout: cgroups.CgroupLayout | None = None
        self._cgroup_lock = asyncio.Lock()
        self.move_warmer = cgroups.MoveLockWarmer()
        self._locks: dict[str, asyncio.Lock] = {}
        self._cpu: dict[str, cgroups.CpuSample] = {}

    # ------------------------------------------------------------ setup

    async def prepare(self) -> None:
        """Find the binaries, make the directories, get the host's cgroups ready."""
        conmon = self.conmon_path or shutil.which("conmon") or ""
        if not conmon:
            raise ContainerError("conmon is not installed; install it with: apt-get install conmon")
        self.conmon_path = conmon
        candidates = [self.runtime_path] if self.runtime_path else ["crun", "runc"]
        found = [p for p in (shutil.which(c) for c in candidates) if p]
        if not found:
            raise ContainerError(
                "no OCI runtime is installed (crun or runc); install one with: apt-get install crun"
            )
        self.runtime_path = found[0]
        try:
            self.layout = await cgroups.ensure_ready(self.cgroup_root)
        except CgroupError:
            runc = shutil.which("runc")
            if self.runtime_name != "crun" or not runc:
                raise
            # runc runs in the hybrid state crun refuses.
            log.warning("falling back to runc: crun cannot run in this cgroup layout")
            self.runtime_path = runc
            self.layout = cgroups.detect_layout(self.cgroup_root)
        self.move_warmer.use(cgroups.own_procs_file(self.layout))
        for directory in (
            self.bundles_dir,
            self.volumes_dir,
            self.exit_dir,
            self.socket_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        log.info(
            "container runtime: %s with conmon, %s cgroup manager, cgroups %s, under %s",
            self.runtime_path,
            self.manager,
            self.layout.mode,
            self.cgroup_parent,
        )

    @property
    def runtime_name(self) -> str:
        return Path(self.runtime_path).name

    def _layout(self) -> cgroups.CgroupLayout:
        if self.layout is None:
            self.layout = cgroups.detect_layout(self.cgroup_root)
        return self.layout

    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    def bundle_dir(self, container_id: str) -> Path:
        return self.bundles_dir / container_id

    def _meta(self, container_id: str) -> dict[str, Any]:
        path = self.bundle_dir(container_id) / bundle_files.META
        try:
            meta: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise ContainerNotFound(f"there is no container {container_id} on this node") from None
        except (OSError, ValueError):
            meta = {}
        return meta

    def state_root(self, runtime_path: str) -> Path:
        """The OCI runtime's ``--root``: one per runtime, whose state formats differ."""
        return self.run_dir / Path(runtime_path).name

    def _runtime_of(self, container_id: str) -> str:
        """The runtime that created the container (a fallback may have changed since)."""
        with contextlib.suppress(ContainerError):
            recorded = str(self._meta(container_id).get("runtime", ""))
            if recorded and os.access(recorded, os.X_OK):
                return recorded
        return self.runtime_path

    def _runtime_args(self, runtime_path: str) -> list[str]:
        args = [f"--root={self.state_root(runtime_path)}"]
        if self.manager == "systemd":
            args.append("--systemd-cgroup")
        return args

    async def _runtime(
        self, container_id: str, *args: str, timeout: float = 30.0
    ) -> tuple[int, str, str]:
        """Run the container's OCI runtime with ``args``: (exit code, stdout, stderr)."""
        runtime = self._runtime_of(container_id)
        try:
            # In a worker thread: subprocess spawns with vfork (about 1 ms), where the
            # event loop's spawn forks agentd's whole memory (10-20 ms) at every stop,
            # kill and delete. On the timeout subprocess kills it and reaps it.
            done = await oci.in_runtime_thread(
                subprocess.run,
                [runtime, *self._runtime_args(runtime), *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=oci.child_env(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ContainerError(
                f"{Path(runtime).name} {args[0]} did not answer within {timeout:.0f}s"
            ) from None
        out, err = done.stdout, done.stderr
        return done.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    # ------------------------------------------------------------ create and start

    async def create(
        self,
        container_id: str,
        spec: ServiceSpec,
        rootfs: ImageRootfs,
        attachment: Attachment | None,
        env: Mapping[str, str],
        *,
        ids: ReplicaIds | None = None,
        args: list[str] | None = None,
        host_resolv: str = "",
    ) -> ContainerInfo:
        """Build the bundle, mount its root and have conmon create the container.

        ``env`` is the spec's env with every reference resolved; ``args``
        replaces the command; ``attachment`` None keeps the host's network.
        """
        if not _ID.match(container_id):
            raise ContainerError(
                f'"{container_id}" is not a usable container id '
                "(letters, digits, '.', '_' and '-', at most 128)"
            )
        ids = ids or ReplicaIds(container_id)
        async with self._creating(container_id):
            bundle_dir = self.bundle_dir(container_id)
            if bundle_dir.exists():
                raise ContainerError(f"container {container_id} already exists on this node")
            layout = self._layout()
            try:
                host = HostFacts.current(
                    cgroups.cgroups_path(
                        container_id,
                        self.manager,
                        spec.cgroup_parent or None,
                        node_parent=self.cgroup_parent,
                    ),
                    layout.has_file("memory", "memory.memsw.limit_in_bytes") or layout.mode == "v2",
                )
                plan = await asyncio.to_thread(
                    build_bundle,
                    spec,
                    rootfs,
                    attachment,
                    env,
                    ids,
                    bundle_dir,
                    self.volumes_dir,
                    host,
                    args=args,
                    host_resolv=host_resolv,
                )
            except SpecRefused as exc:  # the type says no retry can help
                raise SpecRefused(f"container {container_id} could not start: {exc}") from None
            except BundleError as exc:
                raise ContainerError(f"container {container_id} could not start: {exc}") from None
            meta = {
                "id": container_id,
                "created_at": time.time(),
                "runtime": self.runtime_path,
                "manager": self.manager,
                "cgroups_path": host.cgroups_path,
                "named_volumes": [str(p) for p in plan.named_volumes],
                "annotations": plan.config.get("annotations", {}),
            }

            try:
                # A removal that cancels this start waits for the thread laying out the
                # bundle, and for conmon's create, to end: the clean-up below must come
                # after them, or the mount or the container they make after it stays.
                await ended_before_cancel(
                    asyncio.to_thread(
                        bundle_files.lay_out, bundle_dir, meta, plan, rootfs.lower_dirs
                    )
                )
                async with self._cgroup_lock:
                    await ended_before_cancel(self._spawn_conmon(container_id, bundle_dir))
            except BaseException:
                await ended_before_cancel(self._cleanup(container_id))
                raise
            # conmon answered with the pid: created, waiting for start. Said from
            # its files, without one more run of the OCI runtime to ask.
            return ContainerInfo(
                id=container_id,
                status="created",
                pid=oci.read_pidfile(bundle_dir / "ctr.pid"),
                conmon_pid=oci.live_conmon(bundle_dir, container_id),
                bundle=bundle_dir,
                exit=None,
            )

    @contextlib.asynccontextmanager
    async def _creating(self, container_id: str) -> AsyncIterator[None]:
        """The container's lock, with the kernel's cgroup-move lock kept warm for the
        runtime's move of the container's pid (``cgroups.MoveLockWarmer``)."""
        with self.move_warmer.warm():
            async with self._lock(container_id):
                yield

    async def _spawn_conmon(self, container_id: str, bundle_dir: Path) -> None:
        argv = [
            self.conmon_path,
            "--api-version", "1",
            "-c", container_id,
            "-u", container_id,
            "-n", container_id,
            "-r", self.runtime_path,
            "-b", str(bundle_dir),
            "-p", str(bundle_dir / "ctr.pid"),
            "-P", str(bundle_dir / "conmon.pid"),
            "-l", f"k8s-file:{bundle_dir / logs.LOG_NAME}",
            "--log-size-max", str(self.log_size_max),
            "--exit-dir", str(self.exit_dir),
            "--socket-dir-path", str(self.socket_dir),
            # sync(2) of every file system at each exit costs seconds on a busy host.
            "--no-sync-log",
        ]  # fmt: skip
        self.state_root(self.runtime_path).mkdir(parents=True, exist_ok=True)
        for arg in self._runtime_args(self.runtime_path):
            argv += ["--runtime-arg", arg]
        if self.syslog:
            argv.append("--syslog")
        if self.manager == "systemd":
            argv.append("--systemd-cgroup")
        if not self.new_keyring:
            argv.append("--no-new-keyring")
        message = await oci.launch_conmon(argv, bundle_dir)
        if message is None:
            return
        if self.new_keyring and "keyring" in message and "not permitted" in message:
            self.new_keyring = False
            log.warning(
                "this node refuses session keyrings (keyctl is blocked, as inside a "
                "container): replicas share agentd's keyring from now on"
            )
            await self._runtime(container_id, "delete", "--force", container_id)
            return await self._spawn_conmon(container_id, bundle_dir)
        raise ContainerError(f"container {container_id} could not start: {oci.explain(message)}")

    async def start(self, container_id: str) -> int:
        """Start a created container; its PID 1's host pid."""
        self._meta(container_id)
        runtime = self._runtime_of(container_id)
        # crun's start is a write to a fifo; running crun for it costs a process (~10 ms).
        if Path(runtime).name == "crun" and oci.release_created(
            self.state_root(runtime), container_id
        ):
            code, err = 0, ""
        else:
            code, _out, err = await self._runtime(container_id, "start", container_id)
        if code != 0:
            raise ContainerError(f"container {container_id} could not start: {oci.explain(err)}")
        # The pid the runtime wrote at create (asking it for its state costs a run of it).
        pid = oci.read_pidfile(self.bundle_dir(container_id) / "ctr.pid")
        if pid:
            return pid
        return (await self._info(container_id)).pid

    async def run(
        self,
        container_id: str,
        spec: ServiceSpec,
        rootfs: ImageRootfs,
        attachment: Attachment | None,
        env: Mapping[str, str],
        *,
        before_start: Awaitable[object] | None = None,
        **options: Any,
    ) -> int:
        """Create and start; the pid. ``before_start`` is awaited in between (a network
        still being made). A container that cannot start is removed again."""
        await self.create(container_id, spec, rootfs, attachment, env, **options)
        try:
            if before_start is not None:
                await before_start
            return await self.start(container_id)
        except BaseException:
            # A second cancellation (a removal, then agentd's stop) must not cut it short.
            await ended_before_cancel(self.delete(container_id))
            raise

    # ------------------------------------------------------------ state

    async def _runtime_state(self, container_id: str) -> dict[str, Any] | None:
        code, out, _err = await self._runtime(container_id, "state", container_id)
        if code != 0:
            return None
        try:
            state: dict[str, Any] = json.loads(out)
        except ValueError:
            return None
        return state

    async def _info(self, container_id: str) -> ContainerInfo:
        self._meta(container_id)  # ContainerNotFound without a bundle
        bundle_dir = self.bundle_dir(container_id)
        state = await self._runtime_state(container_id)
        conmon_pid = oci.live_conmon(bundle_dir, container_id)
        raw_status = str(state.get("status", "stopped")) if state else "stopped"
        status: ContainerStatus = (
            raw_status if raw_status in ("created", "running", "paused") else "stopped"  # type: ignore[assignment]
        )
        pid = int(state.get("pid", 0) or 0) if state else 0
        if status == "stopped":
            pid = 0
        exit_status = await self.exit_status(container_id) if status == "stopped" else None
        return ContainerInfo(
            id=container_id,
            status=status,
            pid=pid,
            conmon_pid=conmon_pid,
            bundle=bundle_dir,
            exit=exit_status,
        )

    async def state(self, container_id: str) -> ContainerInfo:
        """The container's status; raises ContainerNotFound."""
        return await self._info(container_id)

    async def exit_status(self, container_id: str) -> ExitStatus | None:
        """How the container ended, None while it runs. Learned once and kept in
        the bundle, with the OOM verdict read before the cgroup goes."""
        bundle_dir = self.bundle_dir(container_id)
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads((bundle_dir / EXIT).read_text())
            return ExitStatus(int(saved["code"]), bool(saved["oom_killed"]))
        exit_file = self.exit_dir / container_id
        conmon_alive = bool(oci.live_conmon(bundle_dir, container_id))
        try:
            text = await asyncio.to_thread(exit_file.read_text)
            code = int(text.strip())
        except (OSError, ValueError):
            if conmon_alive or not bundle_dir.exists():
                return None
            state = await self._runtime_state(container_id)
            if state is not None and state.get("status") in ("created", "running", "paused"):
                return None
            # conmon is gone without writing an exit file (killed, or the node rebooted).
            code = oci.UNKNOWN_EXIT
        meta = self._meta(container_id)
        rel = cgroups.relative_dir(str(meta.get("cgroups_path", "")), self.manager)
        oom = await asyncio.to_thread(cgroups.oom_killed, self._layout(), rel) if rel else False
        # The kernel's OOM kill is a SIGKILL; a code of 137 without it was someone's kill -9.
        result = ExitStatus(code, oom)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(
                write_atomically,
                bundle_dir / EXIT,
                json.dumps({"code": code, "oom_killed": oom}),
            )
        return result

    async def wait(self, container_id: str) -> ExitStatus:
        """Until the container ends; how it ended."""
        while True:
            status = await self.exit_status(container_id)
            if status is not None:
                return status
            conmon_pid = oci.live_conmon(self.bundle_dir(container_id), container_id)
            if conmon_pid:
                with contextlib.suppress(TimeoutError):
                    await oci.wait_pid(conmon_pid, 5.0)
            else:
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------ stop and delete

    async def kill(self, container_id: str, sig: str | int = "SIGKILL") -> None:
        """Signal the container's PID 1; nothing when it is not running."""
        number = oci.signal_number(sig)
        code, _out, err = await self._runtime(container_id, "kill", container_id, str(number))
        if code != 0 and "not running" not in err and "does not exist" not in err:
            info = await self._info(container_id)
            if info.status in ("created", "running", "paused"):
                raise ContainerError(
                    f"container {container_id} could not be signalled: {oci.explain(err)}"
                )

    async def stop(
        self, container_id: str, sig: str | int | None = "SIGTERM", grace: float = 10.0
    ) -> ExitStatus:
        """The stop signal, up to ``grace`` seconds to end, then KILL; how it ended."""
        info = await self._info(container_id)
        if info.status == "stopped":
            return await self.wait(container_id)
        if info.status == "running" and grace > 0:
            await self.kill(container_id, sig or "SIGTERM")
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self.wait(container_id), grace)
        await self.kill(container_id, "SIGKILL")
        try:
            return await asyncio.wait_for(self.wait(container_id), KILL_TIMEOUT)
        except TimeoutError:
            raise ContainerError(
                f"container {container_id} did not end within {KILL_TIMEOUT:.0f}s of SIGKILL"
            ) from None

    async def delete(self, container_id: str) -> None:
        """Remove the container and its bundle (named volumes stay); killed first if
        it still runs. Nothing happens for a container that does not exist."""
        async with self._lock(container_id):
            if not self.bundle_dir(container_id).exists():
                return
            with contextlib.suppress(ContainerError):
                info = await self._info(container_id)
                if info.status != "stopped":
                    await self.kill(container_id, "SIGKILL")
                # Learn the exit (and OOM) while the cgroup still exists.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wait(container_id), KILL_TIMEOUT)
            await self._cleanup(container_id)

    async def _cleanup(self, container_id: str) -> None:
        bundle_dir = self.bundle_dir(container_id)
        code, _out, err = await self._runtime(container_id, "delete", "--force", container_id)
        if code != 0 and "does not exist" not in err and "not exist" not in err:
            log.warning("%s delete %s: %s", self.runtime_name, container_id, oci.explain(err))
        conmon_pid = oci.live_conmon(bundle_dir, container_id)
        if conmon_pid:
            with contextlib.suppress(TimeoutError):
                await oci.wait_pid(conmon_pid, 5.0)
            if oci.is_conmon(conmon_pid, container_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(conmon_pid, signal.SIGKILL)
        await asyncio.to_thread(
            bundle_files.remove,
            bundle_dir,
            self.exit_dir / container_id,
            self.socket_dir / container_id,
        )
        self._cpu.pop(container_id, None)
        self._locks.pop(container_id, None)
        async with self._cgroup_lock:
            await asyncio.to_thread(
                cgroups.remove_empty_parents, self._layout(), self.manager, self.cgroup_parent
            )

    # ------------------------------------------------------------ exec

    async def exec(
        self,
        container_id: str,
        argv: list[str],
        tty: bool = False,
        stdin_fd: int = -1,
        stdout_fd: int = -1,
        stderr_fd: int = -1,
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
    ) -> int:
        """Run ``argv`` inside the running container with these descriptors (-1:
        /dev/null); its exit code."""
        info = await self._info(container_id)
        if info.status != "running":
            raise ContainerError(f"container {container_id} is not running")
        if not argv:
            raise ContainerError("exec needs a command")
        args = oci.exec_args(container_id, argv, tty, env, user, cwd)

        def fd(value: int) -> int:
            return value if value >= 0 else asyncio.subprocess.DEVNULL

        runtime = self._runtime_of(container_id)
        proc = await asyncio.create_subprocess_exec(
            runtime,
            *self._runtime_args(runtime),
            *args,
            stdin=fd(stdin_fd),
            stdout=fd(stdout_fd),
            stderr=fd(stderr_fd) if stderr_fd >= 0 else asyncio.subprocess.PIPE,
            env=oci.child_env(),
        )
        _out, err = await proc.communicate()
        return oci.exec_exit_code(proc.returncode, err)

    # ------------------------------------------------------------ logs

    def log_path(self, container_id: str) -> Path:
        return self.bundle_dir(container_id) / logs.LOG_NAME

    def log_paths(self, container_id: str) -> list[Path]:
        """The container's k8s-file logs, oldest first (rotated ones, then the current)."""
        return logs.log_paths(self.bundle_dir(container_id), self.log_files_kept)

    read_log = staticmethod(logs.read_log)

    async def rotate_logs(self, threshold: float = 0.5) -> None:
        """Rotate every log past ``threshold`` of the size bound: the current file
        becomes ``ctr.log.1`` (older ones shift, the oldest goes) and conmon is told
        to reopen. conmon's own ``--log-size-max`` truncates any file that grows
        past the bound before this runs again."""
        bundle_dirs = await asyncio.to_thread(self.bundle_dirs)
        await logs.rotate(bundle_dirs, self.log_size_max, self.log_files_kept, threshold)

    async def rotate_logs_forever(self, interval: float = 2.0) -> None:
        """Run :meth:`rotate_logs` every ``interval`` seconds (a daemon task)."""
        while True:
            try:
                await self.rotate_logs()
            except Exception:
                log.exception("log rotation failed")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ stats

    async def stats(self, container_id: str) -> ReplicaStats:
        """CPU, memory and pids of the container's cgroup."""
        meta = self._meta(container_id)
        rel = cgroups.relative_dir(str(meta.get("cgroups_path", "")), self.manager)
        layout = self._layout()
        previous = self._cpu.get(container_id)
        try:
            if previous is None:
                _stats, previous = await asyncio.to_thread(
                    cgroups.read_stats, container_id, layout, rel, None
                )
                await asyncio.sleep(0.1)
            stats, sample = await asyncio.to_thread(
                cgroups.read_stats, container_id, layout, rel, previous
            )
        except FileNotFoundError:
            raise ContainerError(f"container {container_id} is not running") from None
        self._cpu[container_id] = sample
        return stats

    # ------------------------------------------------------------ adoption

    def bundle_dirs(self) -> list[Path]:
        if not self.bundles_dir.is_dir():
            return []
        return sorted(p for p in self.bundles_dir.iterdir() if (p / bundle_files.META).is_file())

    async def list(self) -> builtins.list[ContainerInfo]:
        """Every container this node has, from the bundles and the runtime's state."""
        found = []
        for bundle_dir in await asyncio.to_thread(self.bundle_dirs):
            with contextlib.suppress(ContainerNotFound):
                found.append(await self._info(bundle_dir.name))
        return found

    async def adopt(self) -> builtins.list[ContainerInfo]:
        """After a restart of agentd: the containers a previous agentd left, with the
        exit codes of those that ended meanwhile (recorded now, before any delete).
        Bundles whose creation never finished are removed."""
        adopted = []
        for info in await self.list():
            bundle_dir = info.bundle
            if not (bundle_dir / "config.json").exists():
                log.warning("removing %s: its creation never finished", info.id)
                await self.delete(info.id)
                continue
            adopted.append(info)
            log.info(
                "found container %s: %s%s",
                info.id,
                info.status,
                f", exit {info.exit.code}" if info.exit else "",
            )
        return adopted
