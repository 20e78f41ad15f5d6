"""``wireguard-go``: WireGuard in userspace, where the kernel has no module.

The process runs in the foreground (``WG_PROCESS_FOREGROUND=1``) as a child of
the daemon that starts it, in a session of its own so that a signal meant for
the daemon's group does not take the mesh down; its PID is kept in a file, so
a restarted daemon finds it again (and a daemon killed outright leaves it
serving). It is stopped by that PID, after checking the PID still names
``wireguard-go`` for the interface. A socket left by a process that died is
removed before a new one starts.

Its UDP sockets get buffers of :data:`SOCKET_BUFFER` (:func:`widen_buffers`):
Debian's ``wireguard-go`` leaves them at the kernel's default (208 KiB), which
a burst of tunnel packets overflows while it decrypts, and every packet the
socket drops is a TCP retransmit inside the tunnel (a transfer between two
nodes lost one packet in five and half its throughput that way).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from shared.libc import last_errno, libc
from shared.mesh.device import Changes, DeviceState, MeshError
from shared.mesh.uapi import SOCKET_DIR, UapiClient, socket_path
from shared.proc import alive

PROGRAM = "wireguard-go"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
BIND_WAIT = 1.0  # seconds for wireguard-go to open its sockets once its link is up
SOCKET_BUFFER = 4 << 20  # bytes each way (the kernel doubles it, for its bookkeeping)
# The socket module names neither; asking for more than rmem_max needs CAP_NET_ADMIN.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SYS_PIDFD_GETFD = 438  # the same number on every architecture (the generic table)


def available() -> bool:
    return shutil.which(PROGRAM) is not None


def runs_for(pid: int, interface: str) -> bool:
    """True if ``pid`` is a live ``wireguard-go <interface>``."""
    if not alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        len(argv) >= 2
        and os.path.basename(argv[0].decode(errors="replace")) == PROGRAM
        and argv[1].decode(errors="replace") == interface
    )


def _take_fd(pidfd: int, fd: int) -> int:
    """A duplicate of another process's descriptor (pidfd_getfd(2))."""
    got = int(libc().syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    if got < 0:
        errno = last_errno()
        raise OSError(errno, os.strerror(errno))
    return got


def widen_buffers(pid: int, size: int = SOCKET_BUFFER) -> tuple[int, int]:
    """Blocking: ``pid``'s UDP sockets get ``size``-byte send and receive buffers where
    theirs are smaller; (UDP sockets found, how many were changed). The sockets are
    the process's own (duplicates of its descriptors): the change holds until it
    binds anew."""
    seen = changed = 0
    pidfd = os.pidfd_open(pid)
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(entry.path).startswith("socket:"):
                    continue
                got = _take_fd(pidfd, int(entry.name))
            except (OSError, ValueError):
                continue  # closed meanwhile
            with socket.socket(fileno=got) as sock:
                if sock.type != socket.SOCK_DGRAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    continue
                seen += 1
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * size:
                    continue
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
                changed += 1
    finally:
        os.close(pidfd)
    return seen, changed


class UserspaceDevice:
    """One interface served by a ``wireguard-go`` process."""

    implementation = "wireguard-go"

    def __init__(
        self, name: str, pid_file: Path, log_file: Path, socket_dir: Path = SOCKET_DIR
    ) -> None:
        self.name = name
        self.pid_file = pid_file
        self.log_file = log_file
        self.socket = socket_path(name, socket_dir)
        self.client = UapiClient(self.socket)
        self._child: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ the process

    def pid(self) -> int | None:
        """The recorded PID if it still runs ``wireguard-go`` for this interface."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if runs_for(pid, self.name) else None

    def running(self) -> bool:
        return self.pid() is not None and self.client.answers()

    def start(self) -> str:
        """Adopt the running process or start one; what was done, for the log."""
        pid = self.pid()
        if pid is not None:
            if self.client.answers():
                return f"found {PROGRAM} {self.name} running (pid {pid})"
            self._kill(pid)  # alive but deaf: start afresh
        if not available():
            raise MeshError(
                f"{PROGRAM} is missing and the kernel has no WireGuard; "
                f"install it with: apt-get install {PROGRAM}"
            )
        if self.socket.exists() and not UapiClient(self.socket).answers():
            # Left by a process that was killed: wireguard-go refuses to start over it.
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
        elif self.socket.exists():
            raise MeshError(
                f"another {PROGRAM} already serves {self.name} ({self.socket}); "
                "stop it or choose another bridge name"
            )
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            child = subprocess.Popen(
                [shutil.which(PROGRAM) or PROGRAM, self.name],
                env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        self._child = child
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(f"{child.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT
        while not self.client.answers():
            if child.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise MeshError(
                    f"{PROGRAM} {self.name} exited with code {child.returncode}: "
                    f"{self._log_tail() or 'no message'}"
                )
            if time.monotonic() > deadline:
                self._kill(child.pid)
                raise MeshError(f"{PROGRAM} {self.name} did not open {self.socket} in time")
            time.sleep(0.02)
        return f"started {PROGRAM} {self.name} (pid {child.pid})"

    def stop(self) -> bool:
        """Stop the process by its PID; False if none ran."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        self._kill(pid)
        return True

    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while runs_for(pid, self.name):
            self._reap(pid)
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline += STOP_TIMEOUT
            time.sleep(0.02)
        self._reap(pid)
        if not self.client.answers():
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()

    def _reap(self, pid: int) -> None:
        # Our own child: collect it so it does not stay a zombie.
        if self._child is not None and self._child.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(timeout=0)

    def _log_tail(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return " ".join(text.strip().splitlines()[-3:])[-300:]

    # ------------------------------------------------------------ configuration

    def widen_buffers(self) -> str:
        """Its UDP sockets' buffers made :data:`SOCKET_BUFFER` (wireguard-go opens them
        anew when the link comes up or the port changes); what was done, for the log."""
        pid = self.pid()
        if pid is None:
            return ""
        try:
            # its sockets come a moment after the link is up (it reads the event)
            deadline = time.monotonic() + BIND_WAIT
            while True:
                seen, changed = widen_buffers(pid)
                if seen or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        except OSError as exc:
            raise MeshError(
                f"cannot widen the socket buffers of {PROGRAM} {self.name} (pid {pid}): "
                f"{exc.strerror or exc}; the mesh runs, slower under load"
            ) from None
        if not changed:
            return ""
        return f"{PROGRAM} {self.name}: {SOCKET_BUFFER >> 20} MiB UDP buffers ({changed} sockets)"

    def get(self) -> DeviceState:
        return self.client.get()

    def apply(self, changes: Changes) -> None:
        if changes:
            self.client.set(changes)
