"""The node network isolates: from another host only published ports reach a
replica, and a replica cannot reach what the node binds to 127.0.0.1.

A real overlayd with its own bridge and nft table, real replica namespaces
with a server each (see test_overlayd_publish), and for "another host" a
namespace behind a veth pair with its own address and a route to the node
subnet through the node.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import test_overlayd_publish as publish
from tests.integration.test_overlayd import Overlayd, in_netns
from tests.integration.test_overlayd_publish import (
    Outside,
    Replicas,
    free_port,
    greeting,
    push,
    replicas,  # noqa: F401 (fixture)
    service,
    start_overlayd,
    tcp_endpoint,
)

pytestmark = publish.pytestmark
make_overlayd = publish.make_overlayd
_netns_dir = publish._netns_dir

# Connects, prints the first line the server sends, or the error's name.
CONNECT = """\
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as conn:
        print(conn.makefile().readline().strip())
except OSError as exc:
    print("error:" + type(exc).__name__)
"""


def connect_from(netns: Any, host: str, port: int) -> str:
    """What a client in ``netns`` reads from ``host:port``: a greeting or "error:<name>"."""
    return in_netns(netns, sys.executable, "-c", CONNECT, host, str(port)).stdout.strip()


def test_from_outside_only_published_ports_reach_replicas(
    make_overlayd: Any,
    replicas: Any,  # noqa: F811
) -> None:
    overlayd: Overlayd = start_overlayd(make_overlayd)
    group: Replicas = replicas(overlayd)
    public = group.add("pub-1")
    internal = group.add("int-1")
    port = free_port()
    internal_endpoint = dict(tcp_endpoint(publish.BACKEND_PORT), expose="internal")
    push(
        overlayd,
        "shop",
        service("shop", "web", [group.backend("pub-1", 1)], [tcp_endpoint(port)]),
        service("shop", "db", [group.backend("int-1", 1)], [internal_endpoint]),
    )
    # Both servers answer the node itself (which is how proxyd reaches them).
    assert greeting(internal.address, publish.BACKEND_PORT) == "int-1"
    assert greeting(public.address, publish.BACKEND_PORT) == "pub-1"

    outside = Outside(overlayd)
    try:
        # IPv4 forwarding is on (host-wide): the forward chain is what guards.
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        assert connect_from(outside.netns, outside.node_address, port) == "pub-1"
        # The internal port, and the published replica's port asked directly,
        # are routed to but dropped: no answer at all.
        for address in (internal.address, public.address):
            seen = connect_from(outside.netns, address, publish.BACKEND_PORT)
            assert seen == "error:TimeoutError", f"{address} answered from outside: {seen}"
        # The published port still answers after the drops (nothing broke on the way).
        assert connect_from(outside.netns, outside.node_address, port) == "pub-1"
    finally:
        outside.close()


@pytest.fixture
def node_loopback_socket() -> Iterator[socket.socket]:
    """A UDP socket on the node's 127.0.0.1 only (one datagram is enough to show
    it is reachable: no answer has to find its way back)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    try:
        yield sock
    finally:
        sock.close()


def route_loopback_to_the_node(netns: str, gateway: str) -> None:
    """What a hostile replica with NET_ADMIN does (CVE-2020-8558): send 127.0.0.0/8
    out of eth0 to the gateway, instead of to its own loopback."""
    for argv in (
        ["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"],
        ["sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1"],
        ["ip", "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local"],
        ["ip", "route", "del", "local", "127.0.0.1", "dev", "lo", "table", "local"],
        ["ip", "route", "add", "127.0.0.0/8", "via", gateway, "dev", "eth0"],
    ):
        result = in_netns(netns, *argv)
        assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"


SEND = """import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    sock.sendto(b"from a replica", ("127.0.0.1", int(sys.argv[1])))
"""


def test_a_replica_cannot_reach_the_node_loopback(
    make_overlayd: Any,
    replicas: Any,  # noqa: F811
    node_loopback_socket: socket.socket,
) -> None:
    overlayd: Overlayd = start_overlayd(make_overlayd)
    group: Replicas = replicas(overlayd)
    group.add("pub-1")
    hostile = group.add("evil-1", serve=False)
    port = free_port()
    push(
        overlayd, "shop", service("shop", "web", [group.backend("pub-1", 1)], [tcp_endpoint(port)])
    )
    gateway = str(overlayd.subnet.network_address + 1)
    # The bridge carries 127.0.0.0/8 (for the node's own 127.0.0.1:<published port>).
    setting = f"/proc/sys/net/ipv4/conf/{overlayd.bridge}/route_localnet"
    assert Path(setting).read_text().strip() == "1"

    route_loopback_to_the_node(hostile.netns, gateway)
    sent = in_netns(hostile, sys.executable, "-c", SEND, str(node_loopback_socket.getsockname()[1]))
    assert sent.returncode == 0, sent.stderr
    with pytest.raises(TimeoutError):
        data, peer = node_loopback_socket.recvfrom(100)
        pytest.fail(f"a replica reached the node's 127.0.0.1: {data!r} from {peer}")
    # Published ports still answer the replica, DNATed on the way.
    assert connect_from(hostile, gateway, port) == "pub-1"
    assert greeting("127.0.0.1", port) == "pub-1"
