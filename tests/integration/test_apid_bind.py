"""zlayer-apid, which has no authentication yet, listens on this node only.

The real apid on a private bus with its default ``http_bind``: it answers on
127.0.0.1 and refuses a connection to the node's other addresses.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Iterator

import psutil
import pytest

from shared.busdaemon import PrivateBus
from shared.paths import Paths
from tests.daemon_process import daemon_process

REST_API = re.compile(r"REST API on (\S+):(\d+)")


def other_addresses() -> list[str]:
    """This node's IPv4 addresses that are not loopback."""
    return [
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


@pytest.fixture
def apid_port(private_bus: PrivateBus, zlayer_prefix: Paths) -> Iterator[int]:
    """The port of the real zlayer-apid, started with the default http_bind."""
    config = zlayer_prefix.daemon_config("apid").read_text()
    assert "http_bind" not in config  # the default is what is tested
    with daemon_process("apid", private_bus, zlayer_prefix) as (process, log):
        deadline = time.monotonic() + 30
        announced = None
        while announced is None:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "zlayer-apid did not listen within 30 s"
            time.sleep(0.1)
            announced = REST_API.search(log.read_text())
        port = int(announced.group(2))
        # Every socket on the API's port (its metrics port may listen everywhere).
        listening = [
            c.laddr.ip
            for c in psutil.Process(process.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listening == ["127.0.0.1"], listening
        yield port


def test_apid_listens_on_loopback_only_by_default(apid_port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{apid_port}/health/live", timeout=10) as reply:
        assert reply.status == 200
    others = other_addresses()
    if not others:
        pytest.skip("this node has no address besides loopback to try")
    for address in others:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, apid_port), timeout=10).close()
