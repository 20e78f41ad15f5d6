"""The built-in supervisor behind ``zlayerctl daemon run``, for hosts without systemd.

It starts a private dbus-daemon and the six daemons as children, speaks the
sd_notify protocol with them (``NOTIFY_SOCKET``: readiness and watchdog
pings, exactly as under systemd), restarts a child that dies or stops pinging
with exponential backoff, and on SIGTERM or Ctrl-C stops them all and removes
everything it created. Its view of the children is kept in
``/run/zlayer/supervisor.json`` for ``zlayerctl status`` and ``daemon stop``.

Like systemd it keeps the descriptors a child stores (``FDSTORE=1``, see
:mod:`ctl.fdstore`) and passes them to the child's next process with
``LISTEN_FDS``, so a listening socket outlives a crash or a restart; they are
closed only when the supervisor stops. It starts the daemons in the order of
the packaged units (:data:`START_AFTER`, their ``After=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ctl.fdstore import ChildStart, FdStore, receive
from ctl.supervisor_state import ChildState as ChildState  # re-exported
from ctl.supervisor_state import SupervisorState as SupervisorState
from shared.bus import BUS_ADDRESS_ENV, DAEMONS, DaemonInfo
from shared.busdaemon import PrivateBus
from shared.libc import libc
from shared.paths import Paths
from shared.statefile import write_atomically

log = logging.getLogger("zlayer.supervisor")

WATCHDOG_SEC = 30.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a child running this long has its backoff reset
LOG_ROTATE_BYTES = 10 * 1024 * 1024
PR_SET_PDEATHSIG = 1

# Who waits for whom at the first start, as the units' After= (tests check
# that the two agree): agentd adopts containers whose images registryd holds
# and whose networks overlayd holds; schedd drives agentd. A daemon waits
# until those it comes after are ready, or READY_TIMEOUT, then starts anyway
# (an order, not a requirement: each waits on the bus for what it calls).
START_AFTER: dict[str, tuple[str, ...]] = {
    "agentd": ("registryd", "overlayd"),
    "schedd": ("agentd",),
    # the internal listeners bind the bridge address overlayd sets up
    "proxyd": ("overlayd",),
}
# Variables that describe our own invocation, not the child's.
_NOT_INHERITED = ("INVOCATION_ID", "JOURNAL_STREAM", "WATCHDOG_PID", "NOTIFY_SOCKET")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor itself dies."""
    libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def find_executable(name: str) -> str:
    """A console script: beside our interpreter first (a venv), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed; reinstall ZLayer")
    return found


@dataclass(frozen=True)
class ChildInfo:
    """A child that is not one of the six daemons (the etcd member)."""

    name: str
    executable: str  # its name in messages
    command: tuple[str, ...]


# This node's etcd member, when its cluster.toml names one (shared.cluster.config):
# started before schedd, which keeps its state there; it sends READY=1 itself
# (it execs etcd) but no watchdog pings.
ETCD = ChildInfo(
    name="etcd", executable="etcd", command=(sys.executable, "-m", "shared.cluster.etcd", "run")
)


@dataclass
class _Child:
    info: DaemonInfo | ChildInfo
    record: ChildState
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    last_ping: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    backoff: float = BACKOFF_FIRST
    fd_store: FdStore = field(default_factory=FdStore)
    retired: bool = False  # taken out (the node left its cluster): not restarted

    @property
    def watchdog(self) -> bool:
        return not isinstance(self.info, ChildInfo)


class Supervisor:
    """Runs the private bus and the six daemons until asked to stop."""

    def __init__(
        self,
        paths: Paths,
        daemons: tuple[DaemonInfo, ...] = DAEMONS,
        announce: Callable[[str], None] = print,
        after: Mapping[str, tuple[str, ...]] = START_AFTER,
    ) -> None:
        self.paths = paths
        self.after = after
        self.announce = announce
        self.bus = PrivateBus(paths.bus_socket)
        self.notify_path = paths.run_dir / "notify.sock"
        self.children = {
            info.name: _Child(info, ChildState(name=info.name, log_file=str(self._log_file(info))))
            for info in daemons
        }
        # schedd reads its state from this node's etcd member, when it runs one
        self.after = {**after, "schedd": (*after.get("schedd", ()), ETCD.name)}
        if daemons == DAEMONS and self._etcd_wanted():
            self._add_etcd()
        self._stopping = asyncio.Event()
        self._notify_sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._started_at = time.time()

    def _log_file(self, info: DaemonInfo | ChildInfo) -> Path:
        return self.paths.log_dir / f"{info.name}.log"

    # ------------------------------------------------------------ state file

    def _write_state(self, ready: bool = False) -> None:
        state = SupervisorState(
            pid=os.getpid(),
            started_at=self._started_at,
            bus_address=self.bus.address,
            bus_pid=self.bus.pid,
            ready=ready,
            daemons={name: child.record for name, child in self.children.items()},
        )
        text = msgspec.json.format(msgspec.json.encode(state), indent=2)
        write_atomically(self.paths.supervisor_state, text)

    # ------------------------------------------------------------ notify socket

    def _open_notify_socket(self) -> None:
        self.notify_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(self.notify_path))
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_notify)
        self._notify_sock = sock

    def _on_notify(self) -> None:
        assert self._notify_sock is not None
        while True:
            message = receive(self._notify_sock)
            if message is None:
                return
            # Only a child's main process speaks for it (systemd's NotifyAccess=main).
            child = self._child_by_pid(message.pid)
            if child is None:
                message.close_fds()
                continue
            for line in message.lines:
                if line == "READY=1":
                    child.record.state = "running"
                    child.ready.set()
                    self._write_state(ready=self._all_ready())
                elif line == "WATCHDOG=1":
                    child.last_ping = time.monotonic()
            refused = child.fd_store.apply(message)
            if refused is not None:
                self.announce(f"{child.info.executable}: {refused}")
            if child.record.fd_store != child.fd_store.names():
                child.record.fd_store = child.fd_store.names()
                self._write_state(ready=self._all_ready())

    def _child_by_pid(self, pid: int) -> _Child | None:
        for child in self.children.values():
            if child.process is not None and child.process.pid == pid:
                return child
        return None

    def _all_ready(self) -> bool:
        return all(child.record.state == "running" for child in self.children.values())

    # ------------------------------------------------------------ children

    async def _spawn(self, child: _Child) -> None:
        from shared.daemon import (  # the daemons' scaffold: not for `status`
            MALLOC_ARENA_MAX,
            OPTIMIZED_DAEMONS,
            PYTHON_OPTIMIZE,
            SUPERVISOR_ENV,
        )

        # Loaded and looked up here: the child calls it between fork and exec.
        libc().prctl  # noqa: B018
        log_file = self._log_file(child.info)
        if log_file.exists() and log_file.stat().st_size > LOG_ROTATE_BYTES:
            log_file.replace(log_file.with_suffix(".log.1"))
        env = {
            BUS_ADDRESS_ENV: self.bus.address,
            "NOTIFY_SOCKET": str(self.notify_path),
            "WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1_000_000)),
            SUPERVISOR_ENV: str(os.getpid()),
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX),
        }
        if child.info.name in OPTIMIZED_DAEMONS:
            env["PYTHONOPTIMIZE"] = PYTHON_OPTIMIZE
        start = ChildStart(
            env=env,
            unset=_NOT_INHERITED,
            passed=child.fd_store.passed(),
            before=_die_with_parent,
        )
        if isinstance(child.info, ChildInfo):
            command = list(child.info.command)
        else:
            command = [find_executable(child.info.executable)]
        # env=None: the child sets its environment itself (LISTEN_PID is its own PID).
        with log_file.open("ab") as output, start.reserved():
            child.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=None,
                pass_fds=start.pass_fds,
                preexec_fn=start.preexec,
            )
        child.started = child.last_ping = time.monotonic()
        child.ready.clear()
        child.record.pid = child.process.pid
        child.record.state = "starting"
        child.record.next_start_at = None
        self._write_state()

    async def _after(self, child: _Child) -> None:
        """Wait until the daemons ``child`` starts after are ready (``after``)."""
        before = [
            self.children[n] for n in self.after.get(child.info.name, ()) if n in self.children
        ]
        if not before:
            return
        ready: asyncio.Future[Any] = asyncio.gather(*(c.ready.wait() for c in before))
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        done, _ = await asyncio.wait(
            {ready, stopped}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        ready.cancel()
        stopped.cancel()
        if not done:
            late = ", ".join(c.info.executable for c in before if not c.ready.is_set())
            self.announce(f"starting {child.info.executable} without waiting longer for {late}")

    async def _watch(self, child: _Child) -> None:
        """Keep one daemon running: restart it with backoff whenever it ends."""
        await self._after(child)
        while not self._stopping.is_set() and not child.retired:
            await self._spawn(child)
            assert child.process is not None
            code = await self._wait_or_watchdog(child)
            if self._stopping.is_set() or child.retired:
                return
            ran_for = time.monotonic() - child.started
            if ran_for >= STABLE_AFTER:
                child.backoff = BACKOFF_FIRST
            child.record.last_exit = code
            child.record.restarts += 1
            child.record.state = "restarting"
            child.record.pid = 0
            child.record.next_start_at = time.time() + child.backoff
            self._write_state()
            self.announce(
                f"{child.info.executable} exited with code {code}; "
                f"restarting in {child.backoff:.1f}s (log: {self._log_file(child.info)})"
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), child.backoff)
            child.backoff = min(child.backoff * 2, BACKOFF_MAX)

    async def _wait_or_watchdog(self, child: _Child) -> int:
        assert child.process is not None
        wait = asyncio.ensure_future(child.process.wait())
        while True:
            done, _ = await asyncio.wait({wait}, timeout=WATCHDOG_SEC / 3)
            if done:
                return wait.result()
            silent = time.monotonic() - child.last_ping
            if child.watchdog and child.ready.is_set() and silent > WATCHDOG_SEC:
                self.announce(
                    f"{child.info.executable} sent no watchdog ping for {silent:.0f}s; killing it"
                )
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGABRT)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(wait), STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                return await wait

    async def _watch_bus(self) -> None:
        """Restart the private bus if it dies; the daemons reconnect by restarting."""
        while not self._stopping.is_set():
            process = self.bus.process
            assert process is not None
            code = await asyncio.to_thread(process.wait)
            if self._stopping.is_set():
                return
            self.announce(f"dbus-daemon exited with code {code}; restarting it")
            await asyncio.to_thread(self.bus.stop)
            await asyncio.to_thread(self.bus.start)
            self._write_state()

    async def _stop_children(self) -> None:
        running = [c.process for c in self.children.values() if c.process is not None]
        for process in running:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        waits = [asyncio.wait_for(p.wait(), STOP_TIMEOUT) for p in running]
        results = await asyncio.gather(*waits, return_exceptions=True)
        for process, result in zip(running, results, strict=True):
            if isinstance(result, asyncio.TimeoutError):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for child in self.children.values():
            child.record.state = "stopped"
            child.record.pid = 0

    # ------------------------------------------------------------ the etcd member

    def _etcd_wanted(self) -> bool:
        from shared.cluster import config

        try:
            found = config.load(self.paths)
        except config.ClusterConfigError as exc:
            self.announce(f"not starting etcd: {exc}")
            return False
        return found is not None and found.etcd is not None

    def _add_etcd(self) -> _Child:
        child = _Child(ETCD, ChildState(name=ETCD.name, log_file=str(self._log_file(ETCD))))
        # first, so the children start in the order of their units
        self.children = {ETCD.name: child, **self.children}
        return child

    def _sync_etcd(self) -> None:
        """SIGUSR1 (schedd, at node init and join): run this node's etcd member or stop
        it, as cluster.toml now says."""
        wanted = self._etcd_wanted()
        child = self.children.get(ETCD.name)
        if wanted and child is None:
            self.announce("starting this node's etcd member (cluster.toml names one)")
            self._tasks.append(asyncio.create_task(self._watch(self._add_etcd())))
            self._write_state()
        elif not wanted and child is not None:
            self.announce("stopping this node's etcd member (cluster.toml names none)")
            child.retired = True
            del self.children[ETCD.name]
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
            self._write_state(ready=self._all_ready())

    # ------------------------------------------------------------ main

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        existing = SupervisorState.read(self.paths)
        if existing is not None:
            self.announce(
                f"ZLayer is already running under zlayerctl (supervisor pid {existing.pid})"
            )
            return 1
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, self._sync_etcd)
        for directory in (self.paths.run_dir, self.paths.log_dir, self.paths.state_dir):
            directory.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.to_thread(self.bus.start)
            self.paths.bus_address_file.write_text(self.bus.address + "\n")
            self._open_notify_socket()
            self._write_state()
            self._tasks = [asyncio.create_task(self._watch(c)) for c in self.children.values()]
            self._tasks.append(asyncio.create_task(self._watch_bus()))
            ready: asyncio.Future[Any] = asyncio.gather(
                *(c.ready.wait() for c in self.children.values())
            )
            stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
            done, _ = await asyncio.wait(
                {ready, stopped}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if ready in done:
                self._write_state(ready=True)
                if on_ready is not None:
                    on_ready()
            elif stopped not in done:
                late = [c.info.executable for c in self.children.values() if not c.ready.is_set()]
                self.announce(
                    f"not ready after {READY_TIMEOUT:.0f}s: {', '.join(late)}; "
                    "still trying (see their logs)"
                )
            ready.cancel()
            await self._stopping.wait()
            stopped.cancel()
            return 0
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stop_children()
        # Stopping for good: nothing will be passed on any more.
        for child in self.children.values():
            child.fd_store.close()
            child.record.fd_store = []
        if self._notify_sock is not None:
            asyncio.get_running_loop().remove_reader(self._notify_sock.fileno())
            self._notify_sock.close()
        self.notify_path.unlink(missing_ok=True)
        await asyncio.to_thread(self.bus.stop)
        self.paths.bus_address_file.unlink(missing_ok=True)
        self.paths.supervisor_state.unlink(missing_ok=True)
