"""Cgroups as agentd meets them: the host's layout, its readiness, and a replica's cgroup.

Owns four things:

- the layout of ``/sys/fs/cgroup`` (v1, v2 or the v1/v2 hybrid) and the
  hybrid state crun refuses (``hugetlb`` attached to the v2 hierarchy), which
  :func:`ensure_ready` repairs by mounting hugetlb as a v1 hierarchy, or
  explains with the exact command to run when it cannot;
- the choice of cgroup manager (systemd's where systemd is PID 1, cgroupfs
  otherwise) and the cgroups path of a replica under the node's parent
  (agentd's ``cgroup_parent``, ``zlayer`` by default), so everything ZLayer
  creates is findable and removable;
- a replica's resource use (:func:`read_stats` into ``ReplicaStats``);
- whether a replica was OOM-killed, read before its cgroup is removed;
- keeping the kernel's cgroup-move lock warm while containers are created
  (:class:`MoveLockWarmer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from daemons.agentd.errors import BundleError, CgroupError
from shared.wire.agent import ReplicaStats

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger("zlayer.agentd.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "zlayer"
# A v1 memory or pids limit this large (or "max") means "no limit".
UNLIMITED_V1 = 1 << 62

_V1_NOT_CONTROLLERS = frozenset(
    {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode", "none"}
)

CgroupManager = Literal["cgroupfs", "systemd"]


@dataclass(frozen=True)
class CgroupLayout:
    """Where each controller lives on this host."""

    mode: Literal["v1", "v2", "hybrid"]
    v1: dict[str, Path] = field(default_factory=dict)  # controller -> hierarchy mount point
    unified: Path | None = None  # the v2 hierarchy, when mounted
    unified_controllers: frozenset[str] = frozenset()

    @property
    def hugetlb_on_v2(self) -> bool:
        """The hybrid state crun refuses: hugetlb held by v2 and no v1 hugetlb hierarchy."""
        return (
            self.mode == "hybrid"
            and "hugetlb" in self.unified_controllers
            and "hugetlb" not in self.v1
        )

    def has_file(self, controller: str, name: str) -> bool:
        """Whether the root of ``controller``'s hierarchy offers ``name`` (e.g. memsw files)."""
        base = self.unified if self.mode == "v2" else self.v1.get(controller)
        return base is not None and (base / name).exists()


def _unescape(value: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        value = value.replace(code, char)
    return value


def detect_layout(
    root: Path = CGROUP_ROOT, mountinfo: Path = Path("/proc/self/mountinfo")
) -> CgroupLayout:
    """Read which cgroup hierarchies are mounted under ``root``."""
    v1: dict[str, Path] = {}
    unified: Path | None = None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        mount_point = Path(_unescape(fields[4]))
        fstype = fields[sep + 1]
        super_opts = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if mount_point != root and root not in mount_point.parents:
            continue
        if fstype == "cgroup2":
            unified = mount_point
        elif fstype == "cgroup":
            for opt in super_opts:
                if opt in _V1_NOT_CONTROLLERS or ("=" in opt and not opt.startswith("name=")):
                    continue
                v1.setdefault(opt, mount_point)
    controllers: frozenset[str] = frozenset()
    if unified is not None:
        with contextlib.suppress(OSError):
            controllers = frozenset((unified / "cgroup.controllers").read_text().split())
    if unified is not None and not v1:
        mode: Literal["v1", "v2", "hybrid"] = "v2"
    elif unified is not None:
        mode = "hybrid"
    else:
        mode = "v1"
    return CgroupLayout(mode, v1, unified, controllers)


def hugetlb_fix_command(root: Path = CGROUP_ROOT) -> str:
    """The command that moves hugetlb to a v1 hierarchy (needed after every boot)."""
    target = root / "hugetlb"
    return f"mkdir -p {target} && mount -t cgroup -o hugetlb cgroup {target}"


def _mount_hugetlb(root: Path) -> str:
    target = root / "hugetlb"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    done = subprocess.run(
        ["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(target)],
        capture_output=True,
        text=True,
    )
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


async def ensure_ready(root: Path = CGROUP_ROOT) -> CgroupLayout:
    """The host's layout, after repairing the hybrid hugetlb state crun refuses.

    Raises :class:`CgroupError` with the command to run when the repair fails.
    """
    layout = await asyncio.to_thread(detect_layout, root)
    if not layout.hugetlb_on_v2:
        return layout
    log.warning(
        "cgroups are in the v1/v2 hybrid state crun refuses (hugetlb on v2); "
        "mounting hugetlb as a v1 hierarchy"
    )
    failure = await asyncio.to_thread(_mount_hugetlb, root)
    layout = await asyncio.to_thread(detect_layout, root)
    if layout.hugetlb_on_v2:
        raise CgroupError(
            "containers cannot run while the hugetlb cgroup controller sits on cgroup v2 "
            f"in a v1/v2 hybrid ({failure or 'the mount did not take'}); run as root: "
            f"{hugetlb_fix_command(root)}"
        )
    return layout


def cgroup_manager(proc1_comm: Path = Path("/proc/1/comm")) -> CgroupManager:
    """systemd's manager where systemd is PID 1, cgroupfs otherwise."""
    try:
        return "systemd" if proc1_comm.read_text().strip() == "systemd" else "cgroupfs"
    except OSError:
        return "cgroupfs"


SLICE = re.compile(r"^[A-Za-z0-9_.@-]+\.slice$")
CGROUP_PART = re.compile(r"^[A-Za-z0-9_.@:-]+$")
# A part of agentd's own parent: also usable in a systemd slice or scope name.
_PARENT_PART = re.compile(r"^[A-Za-z0-9_@][A-Za-z0-9_.@-]*$")


def parent_problem(name: str) -> str | None:
    """Why ``name`` cannot be agentd's cgroup parent, or None when it can.

    A relative cgroup name (``zlayer``, ``ops/zlayer``): under cgroupfs the
    directory under each hierarchy's root, under systemd the slice
    ``ops-zlayer.slice`` (which systemd nests in ``ops.slice``).
    """
    parts = name.split("/")
    if all(_PARENT_PART.match(part) for part in parts) and not any(
        part.endswith("-") or "--" in part for part in parts
    ):
        return None
    return (
        f'"{name}" is not a relative cgroup name like zlayer or ops/zlayer (letters, '
        "digits, '_', '.', '@', and single '-' inside a part; no '..' and no leading '/')"
    )


def node_slice(node_parent: str) -> str:
    """The systemd slice that holds the replicas under ``node_parent``."""
    return node_parent.replace("/", "-") + ".slice"


def cgroups_path(
    container_id: str,
    manager: CgroupManager,
    parent: str | None = None,
    *,
    node_parent: str = PARENT,
) -> str:
    """The OCI ``linux.cgroupsPath`` of a replica: under the spec's ``cgroup_parent``, or
    else under agentd's (``node_parent``, ``zlayer`` unless set).

    With systemd managing cgroups the parent is a slice (``batch.slice``,
    ``zlayer-batch.slice``); with cgroupfs it is a path (``/batch``). Under systemd
    the scope is named after ``node_parent`` too, since scope names are unique per
    machine, not per slice.
    """
    if manager == "systemd":
        slice_ = parent or node_slice(node_parent)
        if not SLICE.match(slice_) or slice_.startswith("-") or "--" in slice_:
            raise BundleError(
                f'cgroup_parent "{parent}" is not a systemd slice name; systemd manages cgroups '
                "on this node, so name a slice, like zlayer-batch.slice"
            )
        return f"{slice_}:{node_parent.replace('/', '-')}:{container_id}"
    if parent is None:
        return f"/{node_parent}/{container_id}"
    parts = [part for part in parent.split("/") if part]
    if not parts or any(part in (".", "..") or not CGROUP_PART.match(part) for part in parts):
        raise BundleError(
            f'cgroup_parent "{parent}" is not a cgroup path; give one like /batch or '
            "/teams/web (letters, digits, '.', '_', '-', '@')"
        )
    return "/" + "/".join([*parts, container_id])


def _slice_dir(slice_: str) -> str:
    """systemd's directory of a slice: ``a-b.slice`` lives in ``a.slice/a-b.slice``."""
    name = slice_.removesuffix(".slice")
    pieces = name.split("-")
    return "/".join("-".join(pieces[: i + 1]) + ".slice" for i in range(len(pieces)))


def relative_dir(path: str, manager: CgroupManager) -> str:
    """The directory (relative to a hierarchy's root) that ``cgroups_path`` names."""
    if manager == "systemd":
        slice_, prefix, name = path.split(":")
        return f"{_slice_dir(slice_)}/{prefix}-{name}.scope"
    return path.lstrip("/")


def container_dirs(layout: CgroupLayout, rel: str) -> dict[str, Path]:
    """The replica's directory in each hierarchy that holds a controller we read."""
    if layout.mode == "v2":
        assert layout.unified is not None
        return {name: layout.unified / rel for name in ("cpu", "memory", "pids")}
    found: dict[str, Path] = {}
    for name in ("cpuacct", "memory", "pids"):
        base = layout.v1.get(name)
        if base is not None:
            found[name] = base / rel
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            continue
    return values


@dataclass(frozen=True)
class CpuSample:
    usage_usec: int
    at: float  # time.monotonic()


def read_cpu_usec(layout: CgroupLayout, rel: str) -> int | None:
    """Total CPU time of the cgroup in microseconds, None when it is gone."""
    dirs = container_dirs(layout, rel)
    if layout.mode == "v2":
        stat = _read_keyed(dirs["cpu"] / "cpu.stat")
        return stat.get("usage_usec")
    if "cpuacct" not in dirs:
        return None
    nanos = _read_int(dirs["cpuacct"] / "cpuacct.usage")
    return None if nanos is None else nanos // 1000


def read_stats(
    container_id: str, layout: CgroupLayout, rel: str, previous: CpuSample | None
) -> tuple[ReplicaStats, CpuSample]:
    """The replica's resource use; CPU percent is measured since ``previous``.

    Raises FileNotFoundError when the cgroup does not exist.
    """
    dirs = container_dirs(layout, rel)
    if not any(d.is_dir() for d in dirs.values()):
        raise FileNotFoundError(str(rel))
    usage = read_cpu_usec(layout, rel) or 0
    now = CpuSample(usage, time.monotonic())
    percent = 0.0
    if previous is not None and now.at > previous.at:
        percent = max(0.0, (usage - previous.usage_usec) / ((now.at - previous.at) * 1e6) * 100)
    if layout.mode == "v2":
        memory = _read_int(dirs["memory"] / "memory.current") or 0
        stat = _read_keyed(dirs["memory"] / "memory.stat")
        # Page cache that can be dropped is not the replica's own use.
        memory = max(0, memory - stat.get("inactive_file", 0))
        limit = _read_int(dirs["memory"] / "memory.max")
        pids = _read_int(dirs["pids"] / "pids.current") or 0
        pids_limit = _read_int(dirs["pids"] / "pids.max")
    else:
        mem = dirs.get("memory")
        memory = (_read_int(mem / "memory.usage_in_bytes") or 0) if mem else 0
        if mem is not None:
            stat = _read_keyed(mem / "memory.stat")
            memory = max(0, memory - stat.get("total_inactive_file", 0))
        limit = _read_int(mem / "memory.limit_in_bytes") if mem else None
        if limit is not None and limit >= UNLIMITED_V1:
            limit = None
        pdir = dirs.get("pids")
        pids = (_read_int(pdir / "pids.current") or 0) if pdir else 0
        pids_limit = _read_int(pdir / "pids.max") if pdir else None
    stats = ReplicaStats(
        id=container_id,
        cpu_usage_usec=usage,
        cpu_percent=round(percent, 2),
        memory_bytes=memory,
        memory_limit_bytes=limit,
        pids=pids,
        pids_limit=pids_limit,
    )
    return stats, now


def oom_killed(layout: CgroupLayout, rel: str) -> bool:
    """Whether the kernel's OOM killer struck inside the replica's cgroup."""
    if layout.mode == "v2":
        assert layout.unified is not None
        events = _read_keyed(layout.unified / rel / "memory.events")
        return events.get("oom_kill", 0) > 0
    base = layout.v1.get("memory")
    if base is None:
        return False
    control = _read_keyed(base / rel / "memory.oom_control")
    if "oom_kill" in control:
        return control["oom_kill"] > 0 or control.get("under_oom", 0) > 0
    # Kernels before 4.13 have no oom_kill counter: a hit limit is the best evidence.
    return (_read_int(base / rel / "memory.failcnt") or 0) > 0


def remove_empty_parents(
    layout: CgroupLayout, manager: CgroupManager, node_parent: str = PARENT
) -> None:
    """Remove agentd's parent cgroup (``node_parent``) in every hierarchy once it holds
    no replica."""
    if manager == "systemd":
        return  # systemd owns its slices
    bases = [layout.unified] if layout.mode == "v2" else list({*layout.v1.values()})
    if layout.mode == "hybrid" and layout.unified is not None:
        bases.append(layout.unified)
    for base in bases:
        if base is None:
            continue
        parent = base / node_parent
        try:
            os.rmdir(parent)
        except OSError:
            continue  # absent, or still holding a replica


def own_procs_file(
    layout: CgroupLayout, self_cgroup: Path = Path("/proc/self/cgroup")
) -> Path | None:
    """The ``cgroup.procs`` of the cgroup this process is in, in one hierarchy of ``layout``
    (the unified one where mounted), or None when none is found."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _hierarchy, controllers, path = line.split(":", 2)
        if not controllers and layout.unified is not None:
            return layout.unified / path.lstrip("/") / "cgroup.procs"
    for line in lines:
        _hierarchy, controllers, path = line.split(":", 2)
        for name in controllers.split(","):
            if name in layout.v1 and not name.startswith("name="):
                return layout.v1[name] / path.lstrip("/") / "cgroup.procs"
    return None


class MoveLockWarmer:
    """Keeps the kernel's lock on moving tasks between cgroups warm while containers
    are created.

    Every move of a task into a cgroup (at each create the OCI runtime writes the
    container's pid into ``cgroup.procs``) takes the kernel's cgroup threadgroup
    lock for writing. When no writer took it for a while, the first one waits a
    whole RCU grace period, 5 to 20 ms (bench/README.md), the largest single
    part of a Deploy; a writer within a grace period of the last one does not
    wait. So while a create is under way, a thread of agentd moves agentd into the
    cgroup it is already in (a move that changes nothing) every few milliseconds.
    The thread does the waiting, never the event loop; with no create under way
    it sleeps. (The ``favordynmods`` cgroup mount option does this for the whole
    host, at a cost to every fork; hosts seldom set it.)
    """

    INTERVAL = 0.003  # well under a grace period

    def __init__(self) -> None:
        self._procs: Path | None = None
        self._wanted = threading.Condition()
        self._users = 0
        self._thread: threading.Thread | None = None
        self.moves = 0  # moves made, for tests

    def use(self, procs: Path | None) -> None:
        """Warm by moving this process into ``procs``'s cgroup (None: do nothing)."""
        self._procs = procs

    @contextlib.contextmanager
    def warm(self) -> Iterator[None]:
        """The lock kept warm for the body's length (the body may nest or overlap others)."""
        with self._wanted:
            self._users += 1
            if self._thread is None and self._procs is not None:
                self._thread = threading.Thread(
                    target=self._keep_warm,
                    args=(self._procs,),
                    name="cgroup-move-warmer",
                    daemon=True,
                )
                self._thread.start()
            self._wanted.notify()
        try:
            yield
        finally:
            with self._wanted:
                self._users -= 1

    def _keep_warm(self, procs: Path) -> None:
        pid = str(os.getpid()).encode()
        try:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.info("container creates wait for the kernel's cgroup lock: %s", exc)
            return
        try:
            while True:
                with self._wanted:
                    while self._users == 0:
                        self._wanted.wait()
                os.write(fd, pid)
                self.moves += 1
                time.sleep(self.INTERVAL)
        except OSError as exc:
            log.info("container creates wait for the kernel's cgroup lock: %s", exc)
        finally:
            os.close(fd)
