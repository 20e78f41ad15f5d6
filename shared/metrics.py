"""Prometheus metrics every daemon serves on its own port.

Process metrics (CPU, memory, open fds) come from prometheus-client's
default collectors; ``zlayer_build_info`` says what runs;
``zlayer_log_records_dropped_total`` counts log lines a stuck journal cost.

The endpoint is prometheus-client's WSGI app on a server of our own that
binds without looking up the host's name: ``http.server.HTTPServer`` asks
for its FQDN at bind (``socket.getfqdn``, a reverse DNS query when the host
name is not in /etc/hosts), and with the resolver unreachable that holds
a daemon's start, before it serves its bus calls, for the resolver's
timeout (5 s a try).
"""

from __future__ import annotations

import platform
import socket
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

BUILD_INFO = Gauge(
    "zlayer_build_info",
    "Always 1; the labels say which daemon and version run.",
    ["daemon", "version", "python"],
)

LOG_RECORDS_DROPPED = Counter(
    "zlayer_log_records_dropped",
    "Log records dropped because the journal (or the reader of stderr) had not taken "
    "the ones before them (shared.logs.QUEUED_RECORDS were waiting).",
)


class _MetricsServer(ThreadingWSGIServer):
    """A threading WSGI server whose name is its bind address, not a DNS answer."""

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    """A scrape is no event for the daemon's log."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def metrics_server(bind: str, port: int) -> WSGIServer:
    """The metrics endpoint bound to ``bind``:``port`` (0: any free port), not serving yet."""
    # the family of the bind address: an IPv6 one needs AF_INET6
    # as bytes: getaddrinfo encodes a str with the idna codec, whose import (unicodedata,
    # stringprep) costs each daemon 0.4 MiB for an address that is ASCII
    host = bind.encode() if bind.isascii() else bind.encode("idna")
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_MetricsServer):
        address_family = family

    return make_server(str(sockaddr[0]), port, make_wsgi_app(), Server, handler_class=_QuietHandler)


def serve_metrics(daemon: str, version: str, bind: str, port: int) -> int:
    """Start the metrics endpoint in a background thread; return the bound port."""
    BUILD_INFO.labels(daemon=daemon, version=version, python=platform.python_version()).set(1)
    server = metrics_server(bind, port)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_port)
