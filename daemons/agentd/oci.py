"""conmon and the OCI runtime (crun or runc) as processes on this node.

Owns what agentd needs to know about processes it starts but does not keep as
children: the environment they get (without agentd's own supervisor
variables), pids and pid files (and whether a pid is still the conmon of a
container, since pids get reused), waiting on a pid that is not a child,
conmon's launch and its answer on the sync pipe, the command line of an exec,
signal names, and the runtime's error output turned into a phrase a person
can act on.

Nothing here knows about bundles or the runtime's state; that is
:class:`~daemons.agentd.runtime.ContainerRuntime`'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ParamSpec, TypeVar

from daemons.agentd import cgroups
from daemons.agentd.errors import ContainerError
from shared.proc import alive

CREATE_TIMEOUT = 60.0
# The runtime's processes (crun, conmon) are waited for in threads of their own: a burst
# of starts and stops, each up to its timeout, must not hold the default pool that
# agentd's record writes and file reads wait in.
RUNTIME_THREADS = 8
_runtime_pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=RUNTIME_THREADS, thread_name_prefix="runtime"
)
P = ParamSpec("P")
T = TypeVar("T")
UNKNOWN_EXIT = 255  # the code reported when a container ended with nobody to record it

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


def child_env(**extra: str) -> dict[str, str]:
    """The environment for conmon and the OCI runtime."""
    env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_VARS}
    env.update(extra)
    return env


def read_pidfile(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def release_created(state_root: Path, container_id: str) -> bool:
    """Start a container crun created, as ``crun start`` does, without running crun:
    the container's first process waits to read one byte from ``exec.fifo`` in
    crun's state directory. True when it was told to go; False when there is no
    waiting reader (started already, or the process died), for ``crun start`` to
    say what is wrong. Only crun's state works this way (runc's fifo runs the other
    way round), and only without poststart hooks, which ZLayer's bundles never have.
    """
    fifo = state_root / container_id / "exec.fifo"
    try:
        # Non-blocking: with no reader the open fails (ENXIO) instead of waiting.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # Gone before the write, as crun does: from then on the state reads "running".
        os.unlink(fifo)
        os.write(fd, b"\0")
    finally:
        os.close(fd)
    return True


def is_conmon(pid: int, container_id: str) -> bool:
    """Whether ``pid`` is still the running conmon of this container (pids get reused)."""
    if not alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"conmon") and container_id.encode() in cmdline


def live_conmon(bundle_dir: Path, container_id: str) -> int:
    """The pid of the container's conmon while it runs, else 0."""
    pid = read_pidfile(bundle_dir / "conmon.pid")
    return pid if is_conmon(pid, container_id) else 0


async def wait_pid(pid: int, timeout: float | None = None) -> None:
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


def signal_number(name: str | int) -> int:
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


def _run_conmon(argv: list[str], bundle_dir: Path) -> bytes:
    """Blocking: start conmon and read its answer. subprocess spawns with vfork: about
    1 ms, where the event loop's fork of agentd's whole memory took 10-20 ms."""
    read_fd, write_fd = os.pipe()
    env = child_env(_OCI_SYNCPIPE=str(write_fd))
    try:
        with open(bundle_dir / "conmon.err", "wb") as errors:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                pass_fds=(write_fd,),
                env=env,
                cwd=bundle_dir,
                start_new_session=True,
            )
        os.close(write_fd)
        write_fd = -1
        raw = _read_sync(read_fd, CREATE_TIMEOUT)
        proc.wait()  # conmon's first process ends once its daemon runs the container
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return raw


async def in_runtime_thread(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``call`` (a wait on crun or conmon) in one of the runtime's own threads."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_runtime_pool, functools.partial(call, *args, **kwargs))


async def launch_conmon(argv: list[str], bundle_dir: Path) -> str | None:
    """Run conmon (``argv``) until it has created the container: None when it did,
    else why not (conmon's message, its stderr, or that it gave no answer).
    Its stderr goes to ``<bundle>/conmon.err``. conmon runs in the bundle
    because it writes an empty file ``oom`` into its working directory when the
    container hits its memory limit."""
    raw = await in_runtime_thread(_run_conmon, argv, bundle_dir)
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {}
    pid = answer.get("data", -1) if isinstance(answer, dict) else -1
    if isinstance(pid, int) and pid > 0:
        return None
    message = answer.get("message", "") if isinstance(answer, dict) else ""
    if not message:
        with contextlib.suppress(OSError):
            message = (bundle_dir / "conmon.err").read_text()
    if not raw and not message:
        message = f"conmon gave no answer within {CREATE_TIMEOUT:.0f}s"
    return str(message)


def exec_args(
    container_id: str,
    argv: list[str],
    tty: bool,
    env: Mapping[str, str] | None,
    user: str | None,
    cwd: str | None,
) -> list[str]:
    """The OCI runtime's arguments that run ``argv`` inside the container."""
    args = ["exec"]
    if tty:
        args.append("--tty")
    for name, value in (env or {}).items():
        args += ["--env", f"{name}={value}"]
    if user:
        args += ["--user", user]
    if cwd:
        args += ["--cwd", cwd]
    return [*args, container_id, *argv]


def exec_exit_code(returncode: int | None, stderr: bytes | None) -> int:
    """An exec's exit code as a shell gives it; ``stderr`` is the runtime's
    output when the caller did not take it."""
    code = returncode if returncode is not None else UNKNOWN_EXIT
    if code < 0:
        code = 128 - code
    if stderr and code != 0:
        detail = explain(stderr.decode(errors="replace"))
        # The shell's codes for "not found" and "not executable", as docker exec gives.
        if "not found in the image" in detail:
            code = 127
        elif "permission denied" in detail:
            code = 126
    return code
