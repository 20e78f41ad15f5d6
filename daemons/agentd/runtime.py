"""The container lifecycle of zlayer-agentd, through conmon and crun (runc as fallback).

Owns everything between "run this replica" and a process in its cgroup:
bundles (:mod:`daemons.agentd.bundle`) with their overlayfs root mounted at
``<bundle>/rootfs``, conmon (which double-forks, so containers outlive
agentd, and which writes k8s-file logs and the exit code), the OCI runtime's
state, stop with a grace period, exec with the caller's descriptors, stats and
OOM from the cgroup, log rotation, and adoption of the containers a previous
agentd left running.

Directories (``state_dir`` persists, ``run_dir`` is volatile)::

    state_dir/bundles/<id>/   config.json rootfs/ upper/ work/ ctr.log* meta.json exit.json
    state_dir/volumes/<name>/ named volumes, kept across replicas and redeploys
    run_dir/crun/ (or runc/)  the OCI runtime's --root
    run_dir/exits/<id>        conmon's exit files
    run_dir/sock/             conmon's attach sockets

Every failure is a :class:`~daemons.agentd.errors.ContainerError` whose
message is one sentence, never the runtime's stderr alone.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import select
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemons.agentd import cgroups
from daemons.agentd.bundle import HostFacts, ReplicaIds, build_bundle
from daemons.agentd.errors import BundleError, CgroupError, ContainerError, ContainerNotFound
from shared import k8slog
from shared.models import Attachment, ImageRootfs, ReplicaStats
from shared.spec import ServiceSpec
from shared.statefile import write_atomically

log = logging.getLogger("zlayer.agentd.runtime")

LOG_NAME = "ctr.log"
META = "meta.json"
EXIT = "exit.json"
CREATE_TIMEOUT = 60.0
KILL_TIMEOUT = 10.0
UNKNOWN_EXIT = 255  # the code reported when a container ended with nobody to record it
MAX_OVERLAY_OPTIONS = 4000  # the kernel takes one page of mount options

ContainerStatus = Literal["created", "running", "paused", "stopped"]

_libc = ctypes.CDLL(None, use_errno=True)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ExitStatus:
    """How a container ended."""

    code: int
    oom_killed: bool
    finished_at: float | None  # Unix time, None when unknown


@dataclass(frozen=True)
class ContainerInfo:
    """One container as this node sees it."""

    id: str
    status: ContainerStatus
    pid: int  # the container's PID 1 on the host, 0 when not running
    conmon_pid: int  # 0 when conmon is gone
    bundle: Path
    created_at: float
    exit: ExitStatus | None  # set once the container has ended
    annotations: dict[str, str] = field(default_factory=dict)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # A zombie has ended; only its parent's wait() is missing.
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _read_pidfile(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _is_conmon_of(pid: int, container_id: str) -> bool:
    """Whether ``pid`` is still the conmon of this container (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"conmon") and container_id.encode() in cmdline


def _signal_number(name: str | int) -> int:
    if isinstance(name, int):
        return name
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise ContainerError(f'"{name}" is not a signal name') from None


def explain(raw: str) -> str:
    """The runtime's error output as a short phrase a person can act on."""
    text = raw.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        with contextlib.suppress(ValueError, TypeError):
            parsed = json.loads(line)
            if isinstance(parsed, dict) and parsed.get("msg"):
                lines = [str(parsed["msg"])]
                break
    joined = " ".join(lines)
    found = re.search(r"executable file [`'\"]?([^`'\"\s]+)[`'\"]? not found", joined)
    if found:
        return f'exec: "{found.group(1)}": not found in the image'
    found = re.search(r"exec(?:ve)? [`'\"]?([^`'\"\s:]+)[`'\"]?: Permission denied", joined)
    if found:
        return f'exec: "{found.group(1)}": permission denied'
    if "hybrid mode" in joined:
        return (
            "the node's cgroups are in a v1/v2 hybrid the runtime refuses; run as root: "
            + cgroups.hugetlb_fix_command()
        )
    if "setrlimit" in joined:
        return "a resource limit (ulimit) is above what this node allows"
    line = lines[-1] if lines else "the runtime gave no reason"
    line = re.sub(r"^(crun|runc|Error|error)(: ?)", "", line).strip()
    line = re.sub(r"^level=\w+ msg=", "", line).strip().strip('"')
    return line or "the runtime gave no reason"


def _read_sync(fd: int, timeout: float) -> bytes:
    """conmon's answer on the sync pipe: one JSON object, or EOF."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return data
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
        with contextlib.suppress(ValueError):
            json.loads(data)
            return data


def _mount_overlay(lower_dirs: list[str], upper: Path, work: Path, target: Path) -> None:
    options = f"lowerdir={':'.join(lower_dirs)},upperdir={upper},workdir={work}"
    if len(options) > MAX_OVERLAY_OPTIONS:
        raise BundleError(
            f"the image has too many layers ({len(lower_dirs)}) for one overlay mount"
        )
    for lower in lower_dirs:
        if not os.path.isdir(lower):
            raise BundleError(f"the image layer directory {lower} is missing; pull the image again")
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise ContainerError(f"the root file system could not be mounted: {os.strerror(err)}")


def _unmount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return  # not mounted
    # Busy: something still holds it open; detach now, the kernel frees it after.
    if _libc.umount2(str(target).encode(), 2) != 0:  # MNT_DETACH
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise ContainerError(f"{target} could not be unmounted: {os.strerror(err)}")


def _is_mounted(target: Path) -> bool:
    wanted = str(target)
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == wanted for line in handle)


# Variables of agentd's own supervisor: crun would take NOTIFY_SOCKET as a
# request to wait for READY=1 from the container, and `crun start` would hang.
_SUPERVISOR_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def _child_env(**extra: str) -> dict[str, str]:
    """The environment for conmon and the OCI runtime."""
    env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_VARS}
    env.update(extra)
    return env


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
    ) -> None:
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
        self.layout: cgroups.CgroupLayout | None = None
        self._cgroup_lock = asyncio.Lock()
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
        for directory in (
            self.bundles_dir,
            self.volumes_dir,
            self.exit_dir,
            self.socket_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        log.info(
            "container runtime: %s with conmon, %s cgroup manager, cgroups %s",
            self.runtime_path,
            self.manager,
            self.layout.mode,
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
        path = self.bundle_dir(container_id) / META
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
        proc = await asyncio.create_subprocess_exec(
            runtime,
            *self._runtime_args(runtime),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ContainerError(
                f"{Path(runtime).name} {args[0]} did not answer within {timeout:.0f}s"
            ) from None
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

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
        async with self._lock(container_id):
            bundle_dir = self.bundle_dir(container_id)
            if bundle_dir.exists():
                raise ContainerError(f"container {container_id} already exists on this node")
            layout = self._layout()
            try:
                host = HostFacts.current(
                    cgroups.cgroups_path(container_id, self.manager, spec.cgroup_parent or None),
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

            def lay_out() -> None:
                bundle_dir.mkdir(parents=True)
                write_atomically(bundle_dir / META, json.dumps(meta))
                for name in ("rootfs", "upper", "work"):
                    (bundle_dir / name).mkdir()
                for name, content in plan.files.items():
                    (bundle_dir / name).write_text(content)
                user = plan.config["process"]["user"]
                for directory in plan.directories:
                    if not directory.exists():
                        directory.mkdir(parents=True)
                        # A fresh volume belongs to the container's user, so a
                        # non-root process can write to it (as Docker does).
                        os.chown(directory, user["uid"], user["gid"])
                (bundle_dir / "config.json").write_text(json.dumps(plan.config, indent=1))
                _mount_overlay(
                    rootfs.lower_dirs,
                    bundle_dir / "upper",
                    bundle_dir / "work",
                    bundle_dir / "rootfs",
                )

            try:
                await asyncio.to_thread(lay_out)
                async with self._cgroup_lock:
                    await self._spawn_conmon(container_id, bundle_dir)
            except BaseException:
                await self._cleanup(container_id)
                raise
            return await self._info(container_id)

    async def _spawn_conmon(self, container_id: str, bundle_dir: Path) -> None:
        read_fd, write_fd = os.pipe()
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
            "-l", f"k8s-file:{bundle_dir / LOG_NAME}",
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
        env = _child_env(_OCI_SYNCPIPE=str(write_fd))
        try:
            with open(bundle_dir / "conmon.err", "wb") as errors:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=errors,
                    pass_fds=(write_fd,),
                    env=env,
                    start_new_session=True,
                )
            os.close(write_fd)
            write_fd = -1
            raw = await asyncio.to_thread(_read_sync, read_fd, CREATE_TIMEOUT)
            await proc.wait()
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        pid = answer.get("data", -1) if isinstance(answer, dict) else -1
        if isinstance(pid, int) and pid > 0:
            return
        message = answer.get("message", "") if isinstance(answer, dict) else ""
        if not message:
            with contextlib.suppress(OSError):
                message = (bundle_dir / "conmon.err").read_text()
        if not raw and not message:
            message = f"conmon gave no answer within {CREATE_TIMEOUT:.0f}s"
        if self.new_keyring and "keyring" in message and "not permitted" in message:
            self.new_keyring = False
            log.warning(
                "this node refuses session keyrings (keyctl is blocked, as inside a "
                "container): replicas share agentd's keyring from now on"
            )
            await self._runtime(container_id, "delete", "--force", container_id)
            return await self._spawn_conmon(container_id, bundle_dir)
        raise ContainerError(f"container {container_id} could not start: {explain(message)}")

    async def start(self, container_id: str) -> int:
        """Start a created container; its PID 1's host pid."""
        self._meta(container_id)
        code, _out, err = await self._runtime(container_id, "start", container_id)
        if code != 0:
            raise ContainerError(f"container {container_id} could not start: {explain(err)}")
        info = await self._info(container_id)
        if info.pid:
            return info.pid
        return _read_pidfile(self.bundle_dir(container_id) / "ctr.pid")

    async def run(
        self,
        container_id: str,
        spec: ServiceSpec,
        rootfs: ImageRootfs,
        attachment: Attachment | None,
        env: Mapping[str, str],
        **options: Any,
    ) -> int:
        """Create and start; the pid. A container that cannot start is removed again."""
        await self.create(container_id, spec, rootfs, attachment, env, **options)
        try:
            return await self.start(container_id)
        except BaseException:
            await self.delete(container_id)
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
        meta = self._meta(container_id)
        bundle_dir = self.bundle_dir(container_id)
        state = await self._runtime_state(container_id)
        conmon_pid = _read_pidfile(bundle_dir / "conmon.pid")
        if not (_pid_alive(conmon_pid) and _is_conmon_of(conmon_pid, container_id)):
            conmon_pid = 0
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
            created_at=float(meta.get("created_at", 0.0)),
            exit=exit_status,
            annotations=dict(meta.get("annotations", {})),
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
            return ExitStatus(int(saved["code"]), bool(saved["oom_killed"]), saved["finished_at"])
        exit_file = self.exit_dir / container_id
        conmon_pid = _read_pidfile(bundle_dir / "conmon.pid")
        conmon_alive = _pid_alive(conmon_pid) and _is_conmon_of(conmon_pid, container_id)
        try:
            text = await asyncio.to_thread(exit_file.read_text)
            code = int(text.strip())
            finished: float | None = exit_file.stat().st_mtime
        except (OSError, ValueError):
            if conmon_alive or not bundle_dir.exists():
                return None
            state = await self._runtime_state(container_id)
            if state is not None and state.get("status") in ("created", "running", "paused"):
                return None
            # conmon is gone without writing an exit file (killed, or the node rebooted).
            code, finished = UNKNOWN_EXIT, None
        meta = self._meta(container_id)
        rel = cgroups.relative_dir(str(meta.get("cgroups_path", "")), self.manager)
        oom = await asyncio.to_thread(cgroups.oom_killed, self._layout(), rel) if rel else False
        # The kernel's OOM kill is a SIGKILL; a code of 137 without it was someone's kill -9.
        result = ExitStatus(code, oom, finished)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(
                write_atomically,
                bundle_dir / EXIT,
                json.dumps({"code": code, "oom_killed": oom, "finished_at": finished}),
            )
        return result

    async def _wait_pid(self, pid: int, timeout: float | None = None) -> None:
        """Until ``pid`` (not necessarily our child) ends."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def ended() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, ended)
        try:
            await asyncio.wait_for(done, timeout)
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def wait(self, container_id: str) -> ExitStatus:
        """Until the container ends; how it ended."""
        while True:
            status = await self.exit_status(container_id)
            if status is not None:
                return status
            conmon_pid = _read_pidfile(self.bundle_dir(container_id) / "conmon.pid")
            if _pid_alive(conmon_pid) and _is_conmon_of(conmon_pid, container_id):
                with contextlib.suppress(TimeoutError):
                    await self._wait_pid(conmon_pid, 5.0)
            else:
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------ stop and delete

    async def kill(self, container_id: str, sig: str | int = "SIGKILL") -> None:
        """Signal the container's PID 1; nothing when it is not running."""
        number = _signal_number(sig)
        code, _out, err = await self._runtime(container_id, "kill", container_id, str(number))
        if code != 0 and "not running" not in err and "does not exist" not in err:
            info = await self._info(container_id)
            if info.status in ("created", "running", "paused"):
                raise ContainerError(
                    f"container {container_id} could not be signalled: {explain(err)}"
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
            log.warning("%s delete %s: %s", self.runtime_name, container_id, explain(err))
        conmon_pid = _read_pidfile(bundle_dir / "conmon.pid")
        if _pid_alive(conmon_pid) and _is_conmon_of(conmon_pid, container_id):
            with contextlib.suppress(TimeoutError):
                await self._wait_pid(conmon_pid, 5.0)
            if _pid_alive(conmon_pid) and _is_conmon_of(conmon_pid, container_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(conmon_pid, signal.SIGKILL)

        def remove_files() -> None:
            rootfs = bundle_dir / "rootfs"
            if _is_mounted(rootfs):
                _unmount(rootfs)
            with contextlib.suppress(FileNotFoundError):
                (self.exit_dir / container_id).unlink()
            sock = self.socket_dir / container_id
            if sock.is_symlink() or sock.is_file():
                sock.unlink()
            elif sock.is_dir():
                shutil.rmtree(sock, ignore_errors=True)
            shutil.rmtree(bundle_dir, ignore_errors=True)

        await asyncio.to_thread(remove_files)
        self._cpu.pop(container_id, None)
        self._locks.pop(container_id, None)
        async with self._cgroup_lock:
            await asyncio.to_thread(cgroups.remove_empty_parents, self._layout(), self.manager)

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
        args = ["exec"]
        if tty:
            args.append("--tty")
        for name, value in (env or {}).items():
            args += ["--env", f"{name}={value}"]
        if user:
            args += ["--user", user]
        if cwd:
            args += ["--cwd", cwd]
        args += [container_id, *argv]

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
            env=_child_env(),
        )
        _out, err = await proc.communicate()
        code = proc.returncode if proc.returncode is not None else UNKNOWN_EXIT
        if code < 0:
            code = 128 - code
        if stderr_fd < 0 and code != 0 and err:
            detail = explain(err.decode(errors="replace"))
            # The shell's codes for "not found" and "not executable", as docker exec gives.
            if "not found in the image" in detail:
                code = 127
            elif "permission denied" in detail:
                code = 126
        return code

    # ------------------------------------------------------------ logs

    def log_path(self, container_id: str) -> Path:
        return self.bundle_dir(container_id) / LOG_NAME

    def log_paths(self, container_id: str) -> list[Path]:
        """The container's k8s-file logs, oldest first (rotated ones, then the current)."""
        current = self.log_path(container_id)
        rotated = [current.with_name(f"{LOG_NAME}.{n}") for n in range(self.log_files_kept, 0, -1)]
        return [p for p in [*rotated, current] if p.exists()]

    @staticmethod
    def read_log(paths: list[Path]) -> list[k8slog.LogLine]:
        """Logical lines of these k8s-file logs, in order."""
        lines: list[str] = []
        for path in paths:
            with contextlib.suppress(OSError), open(path, errors="replace") as handle:
                lines.extend(handle)
        return list(k8slog.parse_lines(lines))

    async def rotate_logs(self, threshold: float = 0.5) -> None:
        """Rotate every log past ``threshold`` of the size bound: the current file
        becomes ``ctr.log.1`` (older ones shift, the oldest goes) and conmon is told
        to reopen. conmon's own ``--log-size-max`` truncates any file that grows
        past the bound before this runs again."""
        for bundle_dir in await asyncio.to_thread(self.bundle_dirs):
            container_id = bundle_dir.name
            current = bundle_dir / LOG_NAME
            try:
                size = current.stat().st_size
            except OSError:
                continue
            if size < self.log_size_max * threshold:
                continue
            conmon_pid = _read_pidfile(bundle_dir / "conmon.pid")
            if not (_pid_alive(conmon_pid) and _is_conmon_of(conmon_pid, container_id)):
                continue
            await asyncio.to_thread(self._shift_logs, current)
            with contextlib.suppress(ProcessLookupError):
                os.kill(conmon_pid, signal.SIGUSR1)

    def _shift_logs(self, current: Path) -> None:
        for n in range(self.log_files_kept, 0, -1):
            older = current.with_name(f"{LOG_NAME}.{n}")
            if n == self.log_files_kept:
                with contextlib.suppress(FileNotFoundError):
                    older.unlink()
            else:
                with contextlib.suppress(FileNotFoundError):
                    older.replace(current.with_name(f"{LOG_NAME}.{n + 1}"))
        if self.log_files_kept > 0:
            current.replace(current.with_name(f"{LOG_NAME}.1"))

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
        return sorted(p for p in self.bundles_dir.iterdir() if (p / META).is_file())

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
