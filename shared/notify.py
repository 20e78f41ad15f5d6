"""sd_notify and the file descriptor store: what a daemon tells its supervisor, both ways.

systemd sets ``NOTIFY_SOCKET``; so does ``zlayerctl daemon run`` for its
children, so one protocol serves both supervisors. Without the variable every
call is a no-op.

Readiness, status text and watchdog pings: :func:`ready`, :func:`status`,
:func:`stopping`, :func:`watchdog_ping`, :func:`watchdog_interval`.

Listening sockets that outlive the process (systemd's file descriptor store,
or the supervisor's, which speaks the same protocol):

- :func:`store_socket` hands a socket to the supervisor under a name
  (``FDSTORE=1``, ``FDNAME=``, the descriptor by ``SCM_RIGHTS``); it replaces
  whatever was stored under that name;
- :func:`remove_socket` drops a name from the store (``FDSTOREREMOVE=1``);
- :func:`listen_fds` returns the sockets passed at start, by name
  (``LISTEN_PID``, ``LISTEN_FDS``, ``LISTEN_FDNAMES``, descriptors from 3;
  socket activation passes its sockets the same way); :func:`take_socket`
  claims one of them;
- :func:`listening_socket` does the usual dance in one call: the passed socket
  of that name if it is bound where asked, else a new one, bound and stored.

A daemon does, once its configuration is read::

    udp = notify.listening_socket("dns-udp", socket.SOCK_DGRAM, host, 53)
    tcp = notify.listening_socket("dns-tcp", socket.SOCK_STREAM, host, 53)
    ...                                    # serve them; on a restart the
                                           # supervisor hands them back
    notify.remove_socket("dns-udp")        # only when the daemon stops serving
                                           # it for good (not on every stop)

and, after taking what it serves, closes what it no longer needs with
``for name, sock in notify.listen_fds().items(): notify.remove_socket(name); sock.close()``.
While the daemon is down the supervisor holds the sockets open: the kernel
keeps queueing connections and datagrams, and the next process answers them.
"""

from __future__ import annotations

import array
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Sequence

log = logging.getLogger("zlayer.notify")

LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here
FDNAME_MAX = 255
SEND_TIMEOUT = 5.0  # a supervisor that does not read must not hang the daemon
DEFAULT_BACKLOG = 511  # as systemd's Backlog= default (SOMAXCONN)

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_passed: dict[str, socket.socket] | None = None
_passed_lock = threading.Lock()


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


# ---------------------------------------------------------------- sending


def _address(path: str) -> str | None:
    if path.startswith("@"):  # abstract namespace, as systemd spells it
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # vsock and others: not a supervisor of ours


def send(message: str, fds: Sequence[int] = ()) -> bool:
    """Send one notify datagram (with descriptors); False without a supervisor.

    OSError when the supervisor's socket cannot be reached.
    """
    path = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(path) if path else None
    if address is None:
        return False
    data = message.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(SEND_TIMEOUT)
        if fds:
            rights = array.array("i", fds).tobytes()
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, address)
        else:
            sock.sendto(data, address)
    return True


def _send_quietly(message: str) -> None:
    try:
        send(message)
    except OSError as exc:
        log.debug("sd_notify %r was not delivered: %s", message, exc)


def ready(status: str = "") -> None:
    _send_quietly("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> None:
    _send_quietly("STOPPING=1")


def status(text: str) -> None:
    _send_quietly(f"STATUS={text}")


def watchdog_ping() -> None:
    _send_quietly("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half the supervisor's timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not enabled():
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000


# ---------------------------------------------------------------- the store


def valid_fdname(name: str) -> bool:
    """What systemd accepts as FDNAME=: 1-255 printable ASCII characters, no colon."""
    return 0 < len(name) <= FDNAME_MAX and all(" " <= ch <= "~" for ch in name) and ":" not in name


def _check_name(name: str) -> None:
    if not valid_fdname(name):
        raise ValueError(f"{name!r} cannot name a stored descriptor (1-255 ASCII, no ':')")


def store_socket(name: str, sock: socket.socket | int) -> bool:
    """Keep ``sock`` in the supervisor's store under ``name``, replacing what it held there.

    True when it was handed over; False without a supervisor or when the
    supervisor could not be reached (logged: the daemon keeps serving, only a
    restart would then refuse connections). ValueError for a bad name.
    """
    _check_name(name)
    fd = sock if isinstance(sock, int) else sock.fileno()
    try:
        # systemd keeps every descriptor sent under a name; remove first so
        # the store holds exactly one per name, as the built-in supervisor does.
        if not send(f"FDSTOREREMOVE=1\nFDNAME={name}"):
            return False
        send(f"FDSTORE=1\nFDNAME={name}", [fd])
    except OSError as exc:
        log.warning("cannot keep the socket %s in the supervisor's store: %s", name, exc)
        return False
    return True


def remove_socket(name: str) -> bool:
    """Drop ``name`` from the supervisor's store; False without a supervisor."""
    _check_name(name)
    try:
        return send(f"FDSTOREREMOVE=1\nFDNAME={name}")
    except OSError as exc:
        log.warning("cannot remove the socket %s from the supervisor's store: %s", name, exc)
        return False


def listen_fds() -> dict[str, socket.socket]:
    """The sockets passed to this process at start and not yet taken, by name.

    The first call reads ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``
    (ignored unless ``LISTEN_PID`` is this process), removes them from the
    environment so children do not inherit them, marks the descriptors
    close-on-exec and wraps each in a socket; later calls return what is left.
    A descriptor that is not a socket is closed; an unnamed one is called
    ``unknown`` (as sd_listen_fds_with_names says); of two with one name the
    first is kept.
    """
    global _passed
    with _passed_lock:
        if _passed is None:
            _passed = _collect()
        return dict(_passed)


def take_socket(name: str) -> socket.socket | None:
    """Claim the passed socket named ``name`` (it leaves :func:`listen_fds`)."""
    listen_fds()
    with _passed_lock:
        assert _passed is not None
        return _passed.pop(name, None)


def _collect() -> dict[str, socket.socket]:
    pid, count, names = (os.environ.get(var) for var in _LISTEN_VARS)
    for var in _LISTEN_VARS:
        os.environ.pop(var, None)
    if not pid or not count:
        return {}
    try:
        if int(pid) != os.getpid():
            return {}  # meant for another process (we were started by it)
        n = int(count)
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid, count)
        return {}
    labels = names.split(":") if names else []
    labels += ["unknown"] * (n - len(labels))
    passed: dict[str, socket.socket] = {}
    for index in range(n):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # not open: nothing to take
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            log.warning("passed descriptor %d (%s) is not a socket; closed", fd, labels[index])
            os.close(fd)
            continue
        if labels[index] in passed:
            log.warning("two passed sockets are named %s; keeping the first", labels[index])
            sock.close()
            continue
        passed[labels[index]] = sock
    return passed


# ---------------------------------------------------------------- the usual dance


def bound_to(sock: socket.socket, kind: socket.SocketKind, host: str, port: int) -> bool:
    """Whether ``sock`` is a ``kind`` socket bound to ``host:port`` (any port if 0)."""
    try:
        if sock.type != kind or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        bound = sock.getsockname()
    except OSError:
        return False
    if port and bound[1] != port:
        return False
    try:
        return ipaddress.ip_address(bound[0]) == ipaddress.ip_address(host or "0.0.0.0")
    except ValueError:
        return False


def listening_socket(
    name: str,
    kind: socket.SocketKind,
    host: str,
    port: int,
    *,
    backlog: int = DEFAULT_BACKLOG,
) -> socket.socket:
    """A non-blocking socket serving ``host:port``: the passed one named ``name``, else new.

    A passed socket bound elsewhere (the configuration changed) is closed and
    dropped from the store. A new socket is bound (SO_REUSEADDR; listening if
    ``kind`` is SOCK_STREAM) and stored under ``name``. OSError if the
    address cannot be bound.
    """
    _check_name(name)
    passed = take_socket(name)
    if passed is not None:
        if bound_to(passed, kind, host, port):
            passed.setblocking(False)
            log.info("serving %s on %s port %d from the kept socket", name, host, port)
            return passed
        log.info("the kept socket %s is not bound to %s port %d; binding anew", name, host, port)
        remove_socket(name)
        passed.close()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    store_socket(name, sock)
    return sock
