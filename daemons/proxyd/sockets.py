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


def take(address: str, port: int, udp: bool = False) -> socket.socket:
    """The socket for (address, port): the kept one, else a new one (then kept).

    A tcp socket is listening. OSError when the port cannot be bound.
    """
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    name = socket_name(address, port, udp)
    return notify.listening_socket(name, kind, address, port, backlog=BACKLOG)


def release(address: str, port: int, udp: bool = False) -> None:
    """No route needs (address, port) any more: the supervisor need not keep it."""
    notify.remove_socket(socket_name(address, port, udp))


def release_leftovers() -> list[str]:
    """Drop and close kept listeners of ours that nothing took; their names."""
    names = [name for name in notify.listen_fds() if name.startswith(PREFIX)]
    for name in names:
        sock = notify.take_socket(name)
        notify.remove_socket(name)
        if sock is not None:
            sock.close()
    return names
