"""The metrics endpoint binds without a DNS lookup: http.server's own bind asks for the
host's FQDN (a reverse query), which held each daemon's start for the resolver's timeout
wherever the resolver did not answer."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest

from shared.metrics import BUILD_INFO, metrics_server


def _no_lookup(*args: object) -> None:
    raise AssertionError(f"the metrics server looked up a name: {args}")


@pytest.mark.parametrize("bind, host", [("0.0.0.0", "127.0.0.1"), ("::1", "[::1]")])
def test_binds_without_a_lookup_and_serves(
    monkeypatch: pytest.MonkeyPatch, bind: str, host: str
) -> None:
    monkeypatch.setattr(socket, "gethostbyaddr", _no_lookup)
    monkeypatch.setattr(socket, "getfqdn", _no_lookup)
    BUILD_INFO.labels(daemon="test", version="0", python="3").set(1)
    try:
        server = metrics_server(bind, 0)
    except OSError as exc:  # a host without IPv6
        pytest.skip(f"cannot bind {bind}: {exc}")
    try:
        scrape = threading.Thread(target=server.handle_request, daemon=True)
        scrape.start()
        url = f"http://{host}:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = answer.read().decode()
        scrape.join(10)
    finally:
        server.server_close()
    assert 'zlayer_build_info{daemon="test"' in body
