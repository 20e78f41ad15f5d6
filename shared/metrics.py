"""Prometheus metrics every daemon serves on its own port.

Process metrics (CPU, memory, open fds) come from prometheus-client's
default collectors; ``zlayer_build_info`` says what runs.
"""

from __future__ import annotations

import platform

from prometheus_client import Gauge, start_http_server

BUILD_INFO = Gauge(
    "zlayer_build_info",
    "Always 1; the labels say which daemon and version run.",
    ["daemon", "version", "python"],
)


def serve_metrics(daemon: str, version: str, bind: str, port: int) -> int:
    """Start the metrics endpoint in a background thread; return the bound port."""
    BUILD_INFO.labels(daemon=daemon, version=version, python=platform.python_version()).set(1)
    server, _thread = start_http_server(port, addr=bind)
    bound: int = server.server_port
    return bound
