"""proxyd's listening sockets, one per (address, port), that outlive the process.

Each is kept in the supervisor's file descriptor store (systemd's, or
``zlayerctl daemon run``'s) under a name like ``proxyd-0.0.0.0-8080`` (tcp:
http, https, websocket and tcp stream endpoints) or
``proxyd-udp-0.0.0.0-5353``. After
a restart, or a ``kill -9``, the next process takes the same socket back:
connections that arrived in between waited in the kernel's queue instead of
being refused. A socket is dropped from the store only when no route needs
its port any more.
"""

from __future__ import annotations

import socket

from shared import notify

BACKLOG = 1024
PREFIX = "proxyd-"


def socket_name(address: str, port: int, udp: bool = False) -> str:
    """``proxyd-0.0.0.0-8080``; a stored descriptor's name may not hold ':' (IPv6 gets '_')."""
    return f"{PREFIX}{'udp-' if udp else ''}{address.replace(':', '_')}-{port}"


# Sockets a listener let go of in order to be made anew on the same port (http
# turned https, tls turned on): reused as they are, since a new bind would find
# the port still held, by the supervisor's copy if by nothing else.
_parked: dict[str, socket.socket] = {}


def take(address: str, port: int, udp: bool = False) -> socket.socket:
    """The socket for (address, port): a parked one, the kept one, else a new one (then kept).

    A tcp socket is listening. OSError when the port cannot be bound.
    """
    name = socket_name(address, port, udp)
    parked = _parked.pop(name, None)
    if parked is not None:
        return parked
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    return notify.listening_socket(name, kind, address, port, backlog=BACKLOG)


def park(address: str, port: int, sock: socket.socket, udp: bool = False) -> None:
    """Keep (a duplicate of) ``sock`` for the next :func:`take` of (address, port)."""
    name = socket_name(address, port, udp)
    old = _parked.pop(name, None)
    if old is not None:
        old.close()
    _parked[name] = sock.dup()


def release(address: str, port: int, udp: bool = False) -> None:
    """No route needs (address, port) any more: the supervisor need not keep it."""
    name = socket_name(address, port, udp)
    parked = _parked.pop(name, None)
    if parked is not None:
        parked.close()
    notify.remove_socket(name)


def release_leftovers() -> list[str]:
    """Drop and close kept and parked sockets of ours that nothing took; their names."""
    names = [name for name in notify.listen_fds() if name.startswith(PREFIX)]
    for name in names:
        sock = notify.take_socket(name)
        notify.remove_socket(name)
        if sock is not None:
            sock.close()
    for name in list(_parked):
        _parked.pop(name).close()
        notify.remove_socket(name)
        names.append(name)
    return names
