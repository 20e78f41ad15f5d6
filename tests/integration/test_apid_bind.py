"""zlayer-apid, which has no authentication yet, listens on this node only.

The real apid on a private bus with its default ``http_bind``: it answers on
127.0.0.1 and refuses a connection to the node's other addresses.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import psutil
import pytest

from ctl.supervisor import find_executable
from shared.busdaemon import PrivateBus
from shared.paths import Paths

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
    log = (zlayer_prefix.prefix / "apid.log").open("wb")
    env = {**os.environ, "ZLAYER_BUS_ADDRESS": private_bus.address}
    process = subprocess.Popen(
        [find_executable("zlayer-apid")], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        announced = None
        while announced is None:
            assert process.poll() is None, (zlayer_prefix.prefix / "apid.log").read_text()
            assert time.monotonic() < deadline, "zlayer-apid did not listen within 30 s"
            time.sleep(0.1)
            announced = REST_API.search((zlayer_prefix.prefix / "apid.log").read_text())
        port = int(announced.group(2))
        # Every socket on the API's port (its metrics port may listen everywhere).
        listening = [
            c.laddr.ip
            for c in psutil.Process(process.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listening == ["127.0.0.1"], listening
        yield port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def test_apid_listens_on_loopback_only_by_default(apid_port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{apid_port}/health/live", timeout=10) as reply:
        assert reply.status == 200
    others = other_addresses()
    if not others:
        pytest.skip("this node has no address besides loopback to try")
    for address in others:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, apid_port), timeout=10).close()
