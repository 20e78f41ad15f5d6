"""The OCI runtime config (``config.json``) of one replica, and the files beside it.

Owns the translation of a validated ``ServiceSpec`` plus an ``ImageRootfs``,
an ``Attachment``, the resolved environment and the replica's ids into what
crun reads: process (Docker's entrypoint/cmd rules, env, user, capabilities,
rlimits clamped to the host), mounts (proc, dev, sys, the bundle's
``/etc/hosts``, ``/etc/resolv.conf`` and ``/etc/hostname``, and the service's
storage), namespaces, cgroup resources and the cgroups path.

:func:`build_bundle` is pure apart from reading the image's ``/etc/passwd``
and ``/etc/group`` (user names) and stat-ing host devices: every fact about
the host arrives in :class:`HostFacts`, so unit tests can pin them. Writing
the files and mounting the root file system is the runtime's job.

What the spec with its image can never be (an unknown user, a relative
path, s3 storage) raises :class:`SpecRefused`: the replica fails once with
the sentence. What the node may yet provide (tini, a device) raises
:class:`BundleError`, and the replica retries.

Bundle layout (``<bundles>/<container id>/``)::

    config.json   rootfs/ (overlayfs mount point)   upper/ work/
    hosts  resolv.conf  hostname   volumes/anon-N/ (anonymous volumes)
"""

from __future__ import annotations

import logging
import os
import re
import resource
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from daemons.agentd.errors import BundleError, SpecRefused
from shared import netfiles
from shared.wire.overlay import Attachment
from shared.wire.registry import ImageRootfs

if TYPE_CHECKING:
    # the spec models (pydantic) load with the first replica, not with agentd
    from shared.spec import ServiceSpec
    from shared.spec.models import Ulimit

log = logging.getLogger("zlayer.agentd.bundle")

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Static, so it runs in any image; bind-mounted read-only where no image has a file.
INIT_BINARIES = (Path("/usr/bin/tini-static"), Path("/usr/bin/catatonit"))
INIT_TARGET = "/run/zlayer-init"
RLIM_INFINITY = 2**64 - 1  # the OCI config's spelling of "unlimited"
CPU_PERIOD = 100_000  # microseconds, the kernel's default CFS period

# Every capability Linux 5.9+ knows, by number.
ALL_CAPS: tuple[str, ...] = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip

# Docker's default set less NET_RAW: enough for ordinary images, nothing that
# reaches the host. NET_RAW would let a replica forge any packet on the node
# bridge (other replicas' addresses, the node's 127.0.0.0/8); a service that
# needs it (ping, packet capture) asks with ``capabilities: [NET_RAW]``.
DEFAULT_CAPS: tuple[str, ...] = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)  # fmt: skip

RLIMITS: dict[str, str] = {
    "as": "RLIMIT_AS", "core": "RLIMIT_CORE", "cpu": "RLIMIT_CPU", "data": "RLIMIT_DATA",
    "fsize": "RLIMIT_FSIZE", "locks": "RLIMIT_LOCKS", "memlock": "RLIMIT_MEMLOCK",
    "msgqueue": "RLIMIT_MSGQUEUE", "nice": "RLIMIT_NICE", "nofile": "RLIMIT_NOFILE",
    "nproc": "RLIMIT_NPROC", "rss": "RLIMIT_RSS", "rtprio": "RLIMIT_RTPRIO",
    "rttime": "RLIMIT_RTTIME", "sigpending": "RLIMIT_SIGPENDING", "stack": "RLIMIT_STACK",
}  # fmt: skip

MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# The devices every container may use (null, zero, full, tty, random, urandom,
# console, ptmx and the pty slaves), plus mknod of anything.
DEFAULT_DEVICE_RULES: tuple[dict[str, Any], ...] = (
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
)

VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ReplicaIds:
    """Who the replica is: the container id and, for labels, where it belongs."""

    container_id: str
    deployment: str = ""
    service: str = ""
    instance: int = 0
    revision: int = 0
    hostname: str = ""  # empty: spec.hostname, else the container id


@dataclass(frozen=True)
class HostFacts:
    """What the config depends on from the host; :meth:`current` reads this one."""

    cgroups_path: str
    rlimit_hard: Mapping[str, int] = field(default_factory=dict)  # RLIMIT_X -> hard, -1 = inf
    cap_bounding: frozenset[str] = frozenset(ALL_CAPS)
    swap_limit: bool = True  # the memory controller can limit memory+swap

    @classmethod
    def current(cls, cgroups_path: str, swap_limit: bool) -> HostFacts:
        hard: dict[str, int] = {}
        for oci_name in RLIMITS.values():
            number = getattr(resource, oci_name, None)
            if number is None:
                continue
            value = resource.getrlimit(number)[1]
            hard[oci_name] = -1 if value == resource.RLIM_INFINITY else value
        return cls(cgroups_path, hard, read_cap_bounding(), swap_limit)


def read_cap_bounding(status: Path = Path("/proc/self/status")) -> frozenset[str]:
    """The capabilities this process may hand on (crun cannot grant any other)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
                return frozenset(n for i, n in enumerate(ALL_CAPS) if mask >> i & 1)
    except (OSError, ValueError):
        pass
    return frozenset(ALL_CAPS)


@dataclass
class Bundle:
    """What :func:`build_bundle` decided: the config and what must exist beside it."""

    config: dict[str, Any]
    files: dict[str, str]  # bundle-relative name -> content (hosts, resolv.conf, hostname)
    directories: list[Path]  # to create before start: named and anonymous volume dirs
    named_volumes: list[Path]  # survive the replica
    # False: the root is the bundle's empty rootfs directory, no overlay of the image's
    # layers mounted on it (a WebAssembly replica: what it runs is bound in).
    overlay_root: bool = True


# ---------------------------------------------------------------- process


def process_args(
    spec: ServiceSpec, rootfs: ImageRootfs, override: list[str] | None = None
) -> list[str]:
    """Docker's rules: a spec entrypoint replaces the image's and drops its cmd;
    spec args replace the cmd; ``override`` (a one-shot command) replaces both."""
    if override is not None:
        args = list(override)
    else:
        command = spec.command
        entrypoint = (
            command.entrypoint if command.entrypoint is not None else rootfs.config.entrypoint
        )
        if command.args is not None:
            cmd = command.args
        elif command.entrypoint is not None:
            cmd = []
        else:
            cmd = rootfs.config.cmd
        args = [*entrypoint, *cmd]
    if not args:
        raise SpecRefused(
            f"the image {rootfs.image.names[0] if rootfs.image.names else rootfs.image.id} "
            "has no entrypoint or cmd and the service gives no command"
        )
    return args


def merge_env(image_env: list[str], env: Mapping[str, str], extra: Mapping[str, str]) -> list[str]:
    """Image env, overlaid by the spec's (resolved) env, then ``extra`` defaults where unset."""
    merged: dict[str, str] = {}
    for item in image_env:
        name, _, value = item.partition("=")
        merged[name] = value
    merged.update(env)
    for name, value in extra.items():
        merged.setdefault(name, value)
    return [f"{name}={value}" for name, value in merged.items()]


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def _image_file(lower_dirs: list[str], name: str) -> str:
    """The content of ``name`` as the overlay would show it (topmost layer wins)."""
    for lower in lower_dirs:
        path = Path(lower) / name
        if path.is_file():
            try:
                return path.read_text(errors="replace")
            except OSError:
                return ""
    return ""


def _table(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(user: str, lower_dirs: list[str]) -> ResolvedUser:
    """``uid``, ``uid:gid``, ``name``, ``name:group`` -> numeric ids, from the image's files."""
    user = user.strip() or "0"
    name, _, group = user.partition(":")
    passwd = _table(_image_file(lower_dirs, "etc/passwd"))
    groups = _table(_image_file(lower_dirs, "etc/group"))
    home = "/"
    if name.isdigit():
        uid = int(name)
        entry = next((e for e in passwd if len(e) > 3 and e[2] == name), None)
        # Docker's rule: a uid the image does not know runs with gid 0.
        gid = int(entry[3]) if entry and entry[3].isdigit() else 0
        if entry and len(entry) > 5:
            home = entry[5]
    else:
        entry = next((e for e in passwd if e and e[0] == name), None)
        if entry is None or len(entry) < 4 or not entry[2].isdigit():
            raise SpecRefused(f'the user "{name}" is not in the image\'s /etc/passwd')
        uid, gid = int(entry[2]), int(entry[3]) if entry[3].isdigit() else 0
        home = entry[5] if len(entry) > 5 else "/"
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = next((g for g in groups if g and g[0] == group), None)
            if match is None or len(match) < 3 or not match[2].isdigit():
                raise SpecRefused(f'the group "{group}" is not in the image\'s /etc/group')
            gid = int(match[2])
    member_of = sorted(
        {
            int(g[2])
            for g in groups
            if len(g) > 3 and g[2].isdigit() and not name.isdigit() and name in g[3].split(",")
        }
        - {gid}
    )
    return ResolvedUser(uid, gid, tuple(member_of), home or "/")


def extra_gids(groups: list[str], lower_dirs: list[str]) -> list[int]:
    """``extra_groups`` (names from the image's /etc/group, or numbers) -> gids."""
    table = _table(_image_file(lower_dirs, "etc/group"))
    found: list[int] = []
    for group in groups:
        group = group.strip()
        if group.isdigit():
            found.append(int(group))
            continue
        match = next((g for g in table if g and g[0] == group), None)
        if match is None or len(match) < 3 or not match[2].isdigit():
            raise SpecRefused(f'the extra group "{group}" is not in the image\'s /etc/group')
        found.append(int(match[2]))
    return found


def init_binary() -> Path:
    """The static init that ``init_container`` runs as PID 1 (tini, like Docker's --init)."""
    for candidate in INIT_BINARIES:
        if candidate.is_file():
            return candidate
    raise BundleError(
        "init_container needs tini on this node; install it with `apt-get install tini`"
    )


def _cap_name(value: str) -> str:
    name = value.strip().upper()
    return name[4:] if name.startswith("CAP_") else name


def capabilities(spec: ServiceSpec, bounding: frozenset[str]) -> tuple[list[str], list[str]]:
    """("CAP_X" names, warnings): Docker's default set,
    plus cap_add, minus cap_drop, every one for privileged; never beyond ``bounding``."""
    warnings: list[str] = []
    adds = [_cap_name(c) for c in spec.capabilities]
    drops = [_cap_name(c) for c in spec.cap_drop]
    for name in (*adds, *drops):
        if name != "ALL" and name not in ALL_CAPS:
            raise SpecRefused(f'"{name}" is not a Linux capability')
    if spec.privileged or "ALL" in adds:
        caps = set(ALL_CAPS)
    elif "ALL" in drops:
        caps = set()
    else:
        caps = set(DEFAULT_CAPS)
    caps.update(a for a in adds if a != "ALL")
    if not spec.privileged:
        caps.difference_update(drops)
    missing = caps - bounding
    if missing and not spec.privileged:
        warnings.append(
            "capabilities this node cannot grant were left out: "
            + ", ".join(f"CAP_{m}" for m in sorted(missing))
        )
    caps &= bounding
    ordered = [f"CAP_{name}" for name in ALL_CAPS if name in caps]
    return ordered, warnings


def rlimits(
    ulimits: Mapping[str, Ulimit | int], hard_limits: Mapping[str, int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The spec's ulimits, each clamped to the host's current hard limit (a container
    cannot raise a hard limit without CAP_SYS_RESOURCE in the bounding set)."""
    result: list[dict[str, Any]] = []
    warnings: list[str] = []
    for name, value in sorted(ulimits.items()):
        oci = RLIMITS.get(name.lower().removeprefix("rlimit_"))
        if oci is None:
            raise SpecRefused(f'"{name}" is not a resource limit ({", ".join(sorted(RLIMITS))})')
        soft, hard = (value, value) if isinstance(value, int) else (value.soft, value.hard)
        soft = RLIM_INFINITY if soft < 0 else soft
        hard = RLIM_INFINITY if hard < 0 else hard
        host = hard_limits.get(oci)
        if host is not None and host >= 0 and hard > host:
            warnings.append(f"ulimit {name} {hard} is above this node's hard limit; using {host}")
            hard = host
        soft = min(soft, hard)
        result.append({"type": oci, "hard": hard, "soft": soft})
    return result, warnings


# ---------------------------------------------------------------- mounts


def _base_mounts(has_netns: bool, minimal: bool = False) -> list[dict[str, Any]]:
    """/proc, /dev and, unless ``minimal``, terminals, shared memory, message queues
    and sysfs: a process that needs none of them (wasmtime) starts without them, each
    one less step of crun's create."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
    ]
    if minimal:
        return mounts
    mounts += [
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
    ]
    if has_netns:
        mounts.append(
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            }
        )
    else:
        # sysfs shows the network namespace of whoever mounts it; without a
        # namespace of its own the container sees the host's, read-only.
        mounts.append(
            {
                "destination": "/sys",
                "type": "bind",
                "source": "/sys",
                "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
            }
        )
    return mounts


def _check_target(target: str) -> str:
    path = PurePosixPath(target)
    if not path.is_absolute() or ".." in path.parts:
        raise SpecRefused(f'the storage target "{target}" must be an absolute path without ".."')
    return str(path)


def storage_mounts(
    spec: ServiceSpec, bundle_dir: Path, volumes_dir: Path
) -> tuple[list[dict[str, Any]], list[Path], list[Path]]:
    """(mounts, directories to create, named volume directories) for ``spec.storage``."""
    from shared.spec.models import (
        AnonymousStorage,
        BindStorage,
        NamedStorage,
        S3Storage,
        TmpfsStorage,
    )

    mounts: list[dict[str, Any]] = []
    dirs: list[Path] = []
    named: list[Path] = []
    for index, item in enumerate(spec.storage):
        if isinstance(item, BindStorage):
            if not os.path.isabs(item.source):
                raise SpecRefused(f'the bind source "{item.source}" must be an absolute path')
            options = ["rbind", "rprivate"] + (["ro"] if item.readonly else [])
            target, source = _check_target(item.target), item.source
        elif isinstance(item, NamedStorage):
            if not VOLUME_NAME.match(item.name):
                raise SpecRefused(
                    f'the volume name "{item.name}" may hold only letters, digits, ".", "_" and "-"'
                )
            path = volumes_dir / item.name
            dirs.append(path)
            named.append(path)
            options = ["rbind", "rprivate"] + (["ro"] if item.readonly else [])
            target, source = _check_target(item.target), str(path)
        elif isinstance(item, AnonymousStorage):
            path = bundle_dir / "volumes" / f"anon-{index}"
            dirs.append(path)
            options = ["rbind", "rprivate"]
            target, source = _check_target(item.target), str(path)
        elif isinstance(item, TmpfsStorage):
            options = ["nosuid", "nodev"]
            if item.size is not None:
                options.append(f"size={item.size}")
            options.append(f"mode={item.mode if item.mode is not None else 0o1777:o}")
            mounts.append(
                {
                    "destination": _check_target(item.target),
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": options,
                }
            )
            continue
        elif isinstance(item, S3Storage):
            raise SpecRefused(
                f"s3 storage ({item.bucket} at {item.target}) is not supported on this node yet"
            )
        else:  # pragma: no cover - the spec's union is exhaustive
            raise BundleError(f"unknown storage type {item!r}")
        mounts.append({"destination": target, "type": "bind", "source": source, "options": options})
    # Parents before children, so /data/logs lands inside /data and not under it.
    mounts.sort(key=lambda m: len(PurePosixPath(m["destination"]).parts))
    return mounts, dirs, named


def _devices(spec: ServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    devices: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    for device in spec.devices:
        try:
            info = os.stat(device.path)
        except OSError as exc:
            raise BundleError(f"the device {device.path} does not exist on this node") from exc
        if stat.S_ISCHR(info.st_mode):
            kind = "c"
        elif stat.S_ISBLK(info.st_mode):
            kind = "b"
        else:
            raise BundleError(f"{device.path} is not a device")
        major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
        devices.append(
            {
                "path": device.path,
                "type": kind,
                "major": major,
                "minor": minor,
                "fileMode": stat.S_IMODE(info.st_mode),
                "uid": 0,
                "gid": 0,
            }
        )
        access = "".join(
            flag
            for flag, on in (("r", device.read), ("w", device.write), ("m", device.mknod))
            if on
        )
        rules.append(
            {"allow": True, "type": kind, "major": major, "minor": minor, "access": access}
        )
    return devices, rules


# ---------------------------------------------------------------- the config


def build_bundle(
    spec: ServiceSpec,
    rootfs: ImageRootfs,
    attachment: Attachment | None,
    env: Mapping[str, str],
    ids: ReplicaIds,
    bundle_dir: Path,
    volumes_dir: Path,
    host: HostFacts,
    *,
    args: list[str] | None = None,
    host_resolv: str = "",
    minimal: bool = False,
) -> Bundle:
    """The replica's config.json and the files and directories it refers to.

    ``env`` is the spec's env with secrets and host references already
    resolved; ``args`` replaces the whole command (one-shot runs);
    ``attachment`` None runs in the host's network namespace; ``minimal``
    leaves out the mounts only a container's programs use (see :func:`_base_mounts`).
    """
    if rootfs.image.runtime == "wasm":
        # wasmtime in a minimal bundle of the module's layer
        from daemons.agentd import wasm

        return wasm.build_bundle(
            spec, rootfs, attachment, env, ids, bundle_dir, volumes_dir, host,
            args=args, host_resolv=host_resolv,
        )  # fmt: skip
    from shared.spec.support import no_new_privileges

    warnings: list[str] = []
    hostname = ids.hostname or spec.hostname or ids.container_id
    user = resolve_user(str(spec.user or rootfs.config.user or "0"), rootfs.lower_dirs)
    caps, cap_warnings = capabilities(spec, host.cap_bounding)
    warnings += cap_warnings
    limits, limit_warnings = rlimits(spec.ulimits, host.rlimit_hard)
    warnings += limit_warnings
    cwd = spec.command.workdir or rootfs.config.workdir or "/"
    if not cwd.startswith("/"):
        raise SpecRefused(f'the working directory "{cwd}" must be an absolute path')
    argv = process_args(spec, rootfs, args)
    init = init_binary() if spec.init_container else None
    if init is not None:
        # tini as PID 1 reaps zombies and forwards signals; "-s" lets it reap as a
        # subreaper too, "-g" sends a signal to the whole process group.
        argv = [INIT_TARGET, "-s", "-g", "--", *argv]
    process: dict[str, Any] = {
        "terminal": False,
        "user": {"uid": user.uid, "gid": user.gid},
        "args": argv,
        "env": merge_env(
            rootfs.config.env,
            env,
            {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, "HOME": user.home},
        ),
        "cwd": cwd,
        "capabilities": {
            "bounding": caps,
            "effective": caps,
            "permitted": caps,
        },
        "noNewPrivileges": no_new_privileges(spec),
    }
    gids = [*user.additional_gids]
    gids += [g for g in extra_gids(spec.extra_groups, rootfs.lower_dirs) if g not in gids]
    if gids:
        process["user"]["additionalGids"] = gids
    if limits:
        process["rlimits"] = limits

    mounts = _base_mounts(attachment is not None, minimal)
    if init is not None:
        mounts.append(
            {
                "destination": INIT_TARGET,
                "type": "bind",
                "source": str(init),
                "options": ["bind", "ro", "nosuid", "nodev"],
            }
        )
    for name, target in (
        ("hosts", "/etc/hosts"),
        ("resolv.conf", "/etc/resolv.conf"),
        ("hostname", "/etc/hostname"),
    ):
        mounts.append(
            {
                "destination": target,
                "type": "bind",
                "source": str(bundle_dir / name),
                "options": ["rbind", "rprivate"],
            }
        )
    volume_mounts, directories, named = storage_mounts(spec, bundle_dir, volumes_dir)
    mounts += volume_mounts

    resources: dict[str, Any] = {}
    limits_res = spec.resources
    if limits_res.cpu is not None:
        resources["cpu"] = {"quota": int(limits_res.cpu * CPU_PERIOD), "period": CPU_PERIOD}
    if limits_res.memory is not None:
        memory: dict[str, Any] = {"limit": limits_res.memory}
        if host.swap_limit:
            # memory+swap equal to memory: no swap, so an over-allocator is OOM-killed
            # instead of thrashing.
            memory["swap"] = limits_res.memory
        resources["memory"] = memory
    if limits_res.pids_limit is not None:
        resources["pids"] = {"limit": limits_res.pids_limit}
    devices, device_rules = _devices(spec)
    if spec.privileged:
        resources["devices"] = [{"allow": True, "access": "rwm"}]
    else:
        resources["devices"] = [*DEFAULT_DEVICE_RULES, *device_rules]

    # pid_mode/ipc_mode host: the host's namespace, so no namespace of its own.
    namespaces: list[dict[str, Any]] = [
        {"type": kind}
        for kind, own in (
            ("pid", spec.pid_mode != "host"),
            ("mount", True),
            ("ipc", spec.ipc_mode != "host"),
            ("uts", True),
        )
        if own
    ]
    if attachment is not None:
        namespaces.append({"type": "network", "path": attachment.netns})

    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": host.cgroups_path,
    }
    if devices:
        linux["devices"] = devices
    if spec.sysctls:
        linux["sysctl"] = {key: str(value) for key, value in spec.sysctls.items()}
    if not spec.privileged:
        # without sysfs, nothing of it to mask
        masked = [p for p in MASKED_PATHS if not (minimal and p.startswith("/sys/"))]
        linux["maskedPaths"] = masked
        linux["readonlyPaths"] = list(READONLY_PATHS)

    annotations = {"org.zlayer.container": ids.container_id}
    if ids.deployment:
        annotations |= {
            "org.zlayer.deployment": ids.deployment,
            "org.zlayer.service": ids.service,
            "org.zlayer.instance": str(ids.instance),
            "org.zlayer.revision": str(ids.revision),
        }
    for key, value in spec.labels.items():
        annotations.setdefault(f"org.zlayer.label.{key}", str(value))

    config: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": "rootfs", "readonly": spec.read_only_root_fs},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
        "annotations": annotations,
    }
    try:
        files = {
            "hosts": netfiles.hosts_file(attachment, hostname, spec.extra_hosts),
            # On the host network the replica resolves as the host does.
            "resolv.conf": (
                netfiles.resolv_conf(attachment, spec.dns)
                if attachment is not None
                else host_resolv or "nameserver 127.0.0.1\n"
            ),
            "hostname": hostname + "\n",
        }
    except netfiles.NetFileError as exc:
        raise SpecRefused(str(exc)) from None  # the spec's hostname, extra_hosts or dns
    for warning in warnings:
        log.warning("%s: %s", ids.container_id, warning)
    return Bundle(config, files, directories, named)
