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
"""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.config import DaemonSettings

Balancing = Literal["round_robin", "least_connections"]


class CertificatePair(BaseModel):
    """One certificate chain and its private key, PEM files."""

    model_config = ConfigDict(extra="forbid")

    cert: Path
    key: Path


class ProxySettings(DaemonSettings):
    # Endpoints carry their own port; these two only keep old files loading.
    http_port: int = Field(80, ge=0, le=65535, description="no effect: endpoints have ports")
    https_port: int = Field(443, ge=0, le=65535, description="no effect: endpoints have ports")
    listen_addresses: list[str] = Field(
        default_factory=lambda: ["0.0.0.0"], description="addresses public listeners bind"
    )
    balancing: Balancing = Field("round_robin", description="how a backend is chosen")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect to a backend")
    response_header_timeout: float = Field(
        60.0, gt=0, description="seconds a backend has to start its response"
    )
    idle_timeout: float = Field(60.0, gt=0, description="seconds an idle connection is kept")
    tls_cert_dir: Path | None = Field(None, description="directory of <hostname>.crt/.key pairs")
    tls_certificates: list[CertificatePair] = Field(
        default_factory=list, description="certificate and key files"
    )
    access_log: bool = Field(True, description="log one line per request")
    upstream_keepalive: int = Field(64, ge=0, description="idle connections kept per backend")

    @field_validator("listen_addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one address is needed")
        return [str(ip_address(item)) for item in value]
