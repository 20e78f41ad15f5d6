"""zlayer-proxyd's settings: ``/etc/zlayer/proxyd.toml`` and ``ZLAYER_PROXYD_*``.

Keys (besides the ones every daemon has):

``listen_addresses``         what public endpoints' listeners bind (L4 ones too), default
                             ``["0.0.0.0"]``; internal endpoints listen on the node
                             network's address alone
``http_port``, ``https_port`` no effect any more (accepted, with a warning, so an old file
                             still starts): each http/https/websocket endpoint is
                             served on its own ``port``, which the spec requires
``balancing``                ``round_robin`` (default) or ``least_connections``
``connect_timeout``          seconds to connect to a backend, default 5
``response_header_timeout``  seconds from a request sent to its response's headers, default 60
``idle_timeout``             seconds a client or pooled backend connection may sit idle, default 60
``tls_cert_dir``             a directory of ``<hostname>.crt`` / ``<hostname>.key`` pairs
``tls_certificates``         a list of ``{cert = "...", key = "..."}`` tables
``access_log``               one log line per request, default true (turn off for benchmarks)
``upstream_keepalive``       idle connections kept per backend, default 64
``max_head_size``            bytes of a request's line and headers (HTTP/1.1; the header list
                             size for HTTP/2), default 65536: past it 431 (414 while still
                             in the request line) and the connection closes
``max_headers``              header fields in a request (trailers count too), default 100:
                             past it 431
``request_head_timeout``     seconds from a request's first byte to the end of its headers
                             (and for a TLS handshake), default 10: past it 408 and close
``max_connections``          client connections per listener (an address and port; each tcp
                             stream endpoint too), default 10000 (lowered to what the open file
                             limit fits unless set here): past it new ones are closed
                             at once, counted in ``zlayer_proxy_connections_refused_total``
``udp_max_sessions``         sessions per udp route, default 1024: a new client past it
                             evicts the one idle longest, counted in
                             ``zlayer_proxy_udp_sessions_evicted_total``
"""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from shared.config import DaemonSettings, invalid

Balancing = Literal["round_robin", "least_connections"]


class CertificatePair(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One certificate chain and its private key, PEM files."""

    cert: Path
    key: Path


class ProxySettings(DaemonSettings, kw_only=True):
    # Endpoints carry their own port; these two only keep old files loading.
    http_port: Annotated[int, Meta(ge=0, le=65535)] = 80
    https_port: Annotated[int, Meta(ge=0, le=65535)] = 443
    # addresses public listeners bind
    listen_addresses: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0"])
    # how a backend is chosen
    balancing: Balancing = "round_robin"
    # seconds to connect to a backend
    connect_timeout: Annotated[float, Meta(gt=0)] = 5.0
    # seconds a backend has to start its response
    response_header_timeout: Annotated[float, Meta(gt=0)] = 60.0
    # seconds an idle connection is kept
    idle_timeout: Annotated[float, Meta(gt=0)] = 60.0
    # directory of <hostname>.crt/.key pairs
    tls_cert_dir: Path | None = None
    # certificate and key files
    tls_certificates: list[CertificatePair] = msgspec.field(default_factory=list)
    # log one line per request
    access_log: bool = True
    # idle connections kept per backend
    upstream_keepalive: Annotated[int, Meta(ge=0)] = 64
    # bytes of a request line and its headers
    max_head_size: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    # header fields in a request
    max_headers: Annotated[int, Meta(ge=1, le=100_000)] = 100
    # seconds from a request's first byte to the end of its headers
    request_head_timeout: Annotated[float, Meta(gt=0)] = 10.0
    # client connections per listener
    max_connections: Annotated[int, Meta(ge=1)] = 10_000
    # sessions per udp route
    udp_max_sessions: Annotated[int, Meta(ge=1)] = 1024

    def __post_init__(self) -> None:
        if not self.listen_addresses:
            raise invalid("listen_addresses", "at least one address is needed")
        try:
            self.listen_addresses = [str(ip_address(item)) for item in self.listen_addresses]
        except ValueError as exc:
            raise invalid("listen_addresses", str(exc)) from None
