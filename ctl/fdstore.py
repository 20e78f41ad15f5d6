"""The built-in supervisor's file descriptor store, systemd's protocol on both sides.

A child hands a socket over with ``FDSTORE=1``/``FDNAME=`` and the descriptor
(``SCM_RIGHTS``) on the notify socket, drops it with ``FDSTOREREMOVE=1``
(see :mod:`shared.notify`). :class:`FdStore` keeps one child's descriptors
by name, a new one replacing the same-named, at most ``limit`` of them.
:class:`ChildStart` starts the child's next process with them: descriptors
from 3 on, ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` set to the
new process's own PID, exactly as systemd passes its store and its sockets.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from shared.notify import LISTEN_FDS_START, valid_fdname

log = logging.getLogger("zlayer.supervisor")

FD_STORE_MAX = 64  # per child: the most any packaged unit allows (FileDescriptorStoreMax=)
MAX_FDS_PER_MESSAGE = 16
NOTIFY_MESSAGE_MAX = 4096
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_INT = array.array("i").itemsize


@dataclass
class NotifyMessage:
    """One datagram on the notify socket: its sender, its lines, the descriptors it carried."""

    pid: int
    lines: list[str]
    fds: list[int] = field(default_factory=list)

    def value(self, key: str) -> str | None:
        """The value of the last ``KEY=value`` line, or None."""
        found = None
        for line in self.lines:
            name, sep, value = line.partition("=")
            if sep and name == key:
                found = value
        return found

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def receive(sock: socket.socket) -> NotifyMessage | None:
    """Read one datagram from a non-blocking ``SO_PASSCRED`` socket; None when none waits.

    Descriptors arrive close-on-exec; a message whose descriptors did not
    all fit is returned without any (the received ones are closed).
    """
    space = socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _INT)
    try:
        data, ancdata, flags, _addr = sock.recvmsg(
            NOTIFY_MESSAGE_MAX, space, socket.MSG_CMSG_CLOEXEC
        )
    except BlockingIOError:
        return None
    message = NotifyMessage(pid=0, lines=data.decode(errors="replace").splitlines())
    for level, kind, payload in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS:
            message.pid = _CREDS.unpack(payload[: _CREDS.size])[0]
        elif kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % _INT])
            message.fds.extend(fds)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        log.warning(
            "a notify message from pid %d was cut short; its descriptors are dropped", message.pid
        )
        message.close_fds()
    return message


class FdStore:
    """One child's stored descriptors, by name, in the order they were stored."""

    def __init__(self, limit: int = FD_STORE_MAX) -> None:
        self.limit = limit
        self._fds: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return sum(len(fds) for fds in self._fds.values())

    def names(self) -> list[str]:
        return list(self._fds)

    def apply(self, message: NotifyMessage) -> str | None:
        """Apply FDSTOREREMOVE=1 then FDSTORE=1 from ``message``; what was refused, or None.

        Takes ownership of the message's descriptors: stored ones are kept,
        every other one is closed.
        """
        refused = None
        name = message.value("FDNAME")
        if message.value("FDSTOREREMOVE") == "1":
            if name and valid_fdname(name):
                self.remove(name)
            else:
                refused = "FDSTOREREMOVE=1 needs a valid FDNAME="
        if message.value("FDSTORE") == "1" and message.fds:
            name = name or "stored"  # systemd's name for an unnamed stored descriptor
            if not valid_fdname(name):
                refused = f"{name!r} cannot name a stored descriptor"
            else:
                kept = len(self) - len(self._fds.get(name, []))
                if kept + len(message.fds) > self.limit:
                    refused = f"the store is full ({self.limit} descriptors): {name} was not kept"
                else:
                    self.remove(name)
                    self._fds[name] = list(message.fds)
                    message.fds.clear()
        message.close_fds()
        return refused

    def remove(self, name: str) -> None:
        for fd in self._fds.pop(name, []):
            with contextlib.suppress(OSError):
                os.close(fd)

    def passed(self) -> list[tuple[str, int]]:
        """Every stored descriptor with its name, as the next start passes them."""
        return [(name, fd) for name, fds in self._fds.items() for fd in fds]

    def close(self) -> None:
        for name in list(self._fds):
            self.remove(name)


class ChildStart:
    """The environment and ``LISTEN_FDS`` descriptors of a child about to be started.

    Give :meth:`preexec` as ``preexec_fn``, :attr:`pass_fds` as ``pass_fds``
    and ``env=None`` to ``subprocess``/asyncio, inside :meth:`reserved`. In the
    child, before exec, it puts the descriptors at 3, 4, ... and sets the
    environment, including ``LISTEN_PID``, which only the child knows: that
    is why the environment is set there (exec then takes the process's own).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        unset: Sequence[str] = (),
        passed: Sequence[tuple[str, int]] = (),
        before: Callable[[], None] | None = None,
    ) -> None:
        self.env = dict(env)
        self.unset = [*unset, "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]
        self.passed = list(passed)
        self.before = before

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + len(self.passed)))

    @contextlib.contextmanager
    def reserved(self) -> Iterator[None]:
        """Hold every descriptor number the child's passed ones will take.

        subprocess keeps ``pass_fds`` open in the child and reports exec
        errors through a pipe it opens at the lowest free numbers: with 3..n
        all taken in the parent, that pipe cannot land where the passed
        descriptors go, and every number in ``pass_fds`` is open.
        """
        top = LISTEN_FDS_START + len(self.passed)
        placeholders: list[int] = []
        try:
            while self.passed:
                fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                if fd >= top:
                    os.close(fd)
                    break
                placeholders.append(fd)
            yield
        finally:
            for fd in placeholders:
                os.close(fd)

    def preexec(self) -> None:
        """In the child, between fork and exec."""
        if self.before is not None:
            self.before()
        top = LISTEN_FDS_START + len(self.passed)
        # First above every target, then onto the targets: a source may sit
        # where another one goes.
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for _, fd in self.passed]
        for index, fd in enumerate(moved):
            os.dup2(fd, LISTEN_FDS_START + index, inheritable=True)
            os.close(fd)
        for name in self.unset:
            os.unsetenv(name)
        for name, value in self.env.items():
            os.putenv(name, value)
        if self.passed:
            os.putenv("LISTEN_PID", str(os.getpid()))
            os.putenv("LISTEN_FDS", str(len(self.passed)))
            os.putenv("LISTEN_FDNAMES", ":".join(name for name, _ in self.passed))
