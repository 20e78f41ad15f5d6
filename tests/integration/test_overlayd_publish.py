"""zlayer-overlayd's kernel L4 path: public tcp/udp endpoints published with nftables DNAT.

Each test runs a real overlayd on a private bus with a bridge of its own,
attaches real replica namespaces, runs a small TCP/UDP server inside each
(it greets with its own name, so the client sees which backend answered),
pushes a DeploymentTraffic with SetTraffic, and connects the way users
would: to 127.0.0.1 and the node's addresses on the node, from another
host (a namespace behind a veth), and from a replica (hairpin).
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.bus import ConflictError, InvalidArgumentError
from shared.wire import encode
from shared.wire.overlay import Attachment
from shared.wire.traffic import Backend, DeploymentTraffic, ServiceTraffic
from tests.integration import test_overlayd as base
from tests.integration.test_overlayd import Overlayd, in_netns

# The overlayd fixtures and skip conditions of the base overlayd tests.
pytestmark = base.pytestmark
make_overlayd = base.make_overlayd
_netns_dir = base._netns_dir

# A backend: greets each TCP connection with its name, then echoes; answers
# each UDP datagram with "<name>:<datagram>".
SERVER = """\
import socket, sys, threading
name, port = sys.argv[1].encode(), int(sys.argv[2])
def serve(conn):
    with conn:
        conn.sendall(name + b"\\n")
        while data := conn.recv(4096):
            conn.sendall(data)
def udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(4096)
        sock.sendto(name + b":" + data, peer)
threading.Thread(target=udp, daemon=True).start()
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port))
tcp.listen(128)
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

BACKEND_PORT = 8080
_ports = itertools.count()


def free_port() -> int:
    """A node port for one test to publish (distinct per test process and call)."""
    return 21000 + (os.getpid() % 200) * 40 + next(_ports) % 40


class Replicas:
    """Attached namespaces, each with a server of its own; all stopped and detached at the end."""

    def __init__(self, overlayd: Overlayd, script: Path) -> None:
        self.overlayd = overlayd
        self.script = script
        self.attachments: dict[str, Attachment] = {}
        self.servers: dict[str, subprocess.Popen[str]] = {}

    def add(self, name: str, serve: bool = True) -> Attachment:
        attachment = self.overlayd.attach(name, name)
        self.attachments[name] = attachment
        if serve:
            self.serve(name)
        return attachment

    def serve(self, name: str) -> None:
        netns = Path(self.attachments[name].netns).name
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(self.script), name, "8080"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.servers[name] = server
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready", f"the server in {name} did not start"

    def kill(self, name: str) -> None:
        server = self.servers.pop(name)
        server.kill()
        server.wait()

    def backend(self, name: str, instance: int, revision: int = 1) -> Backend:
        return Backend(
            replica=name,
            instance=instance,
            revision=revision,
            address=self.attachments[name].address,
        )

    def close(self) -> None:
        for name in list(self.servers):
            self.kill(name)
        for name in self.attachments:
            self.overlayd.detach(name)


@pytest.fixture
def replicas(make_overlayd: Any, tmp_path: Path) -> Iterator[Any]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    made: list[Replicas] = []

    def make(overlayd: Overlayd) -> Replicas:
        made.append(Replicas(overlayd, script))
        return made[-1]

    try:
        yield make
    finally:
        for group in made:
            group.close()


def start_overlayd(make_overlayd: Any, extra: str = "") -> Overlayd:
    daemon: Overlayd = make_overlayd()
    config = daemon.paths.daemon_config("overlayd")
    config.write_text(config.read_text() + extra)
    daemon.start()
    return daemon


def service(
    deployment: str,
    name: str,
    backends: list[Backend],
    endpoints: list[dict[str, Any]],
) -> ServiceTraffic:
    return ServiceTraffic(
        deployment=deployment, service=name, endpoints=endpoints, backends=backends
    )


def push(overlayd: Overlayd, deployment: str, *services: ServiceTraffic) -> None:
    traffic = DeploymentTraffic(deployment=deployment, services=list(services))
    overlayd.call("set_traffic", deployment, encode(traffic))


def tcp_endpoint(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "tcp",
        "protocol": "tcp",
        "port": port,
        "target_port": BACKEND_PORT,
        "expose": "public",
        **extra,
    }


def greeting(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=3) as conn:
        return conn.makefile().readline().strip()


def nft_rules(overlayd: Overlayd) -> str:
    return subprocess.run(
        ["nft", "list", "table", "ip", overlayd.table], capture_output=True, text=True, check=True
    ).stdout


class Outside:
    """Another host: a namespace behind a veth pair, routed to the node."""

    def __init__(self, overlayd: Overlayd) -> None:
        tag = overlayd.bridge[3:]
        self.netns, self.host_end, far_end = f"zlout{tag}", f"zlo{tag}h", f"zlo{tag}p"
        third = (overlayd.subnet.network_address.packed[2] + 64) % 256
        self.node_address, far_ip = f"10.234.{third}.1", f"10.234.{third}.2"
        try:
            for argv in (
                ["ip", "netns", "add", self.netns],
                ["ip", "link", "add", self.host_end, "type", "veth", "peer", "name", far_end],
                ["ip", "link", "set", far_end, "netns", self.netns],
                ["ip", "addr", "add", f"{self.node_address}/30", "dev", self.host_end],
                ["ip", "link", "set", self.host_end, "up"],
                ["ip", "-n", self.netns, "addr", "add", f"{far_ip}/30", "dev", far_end],
                ["ip", "-n", self.netns, "link", "set", far_end, "up"],
                ["ip", "-n", self.netns, "route", "add", "default", "via", self.node_address],
            ):
                subprocess.run(argv, check=True, capture_output=True)
        except BaseException:  # the caller's finally has no object to close yet
            self.close()
            raise

    def greeting(self, port: int) -> str:
        code = (
            "import socket,sys\n"
            f"c=socket.create_connection(('{self.node_address}',{port}),timeout=3)\n"
            "print(c.makefile().readline().strip())\n"
        )
        return in_netns(self.netns, sys.executable, "-c", code).stdout.strip()

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


# ---------------------------------------------------------------- tests


def test_tcp_port_spreads_over_backends_from_everywhere(make_overlayd: Any, replicas: Any) -> None:
    overlayd = start_overlayd(make_overlayd)
    group: Replicas = replicas(overlayd)
    names = ["web-1", "web-2", "web-3"]
    for name in names:
        group.add(name)
    port = free_port()
    backends = [group.backend(name, i + 1) for i, name in enumerate(names)]
    push(overlayd, "shop", service("shop", "web", backends, [tcp_endpoint(port)]))

    rules = nft_rules(overlayd)
    assert re.search(rf"tcp dport {port} dnat (ip )?to numgen inc mod 3 map", rules), rules
    gateway = str(overlayd.subnet.network_address + 1)

    # From the node itself: localhost and the node's own address.
    seen = Counter(greeting("127.0.0.1", port) for _ in range(30))
    assert set(seen) == set(names), seen
    assert min(seen.values()) >= 5, f"connections were not spread: {seen}"
    assert greeting(gateway, port) in names

    # From another host, through prerouting.
    outside = Outside(overlayd)
    try:
        assert {outside.greeting(port) for _ in range(6)} == set(names)
    finally:
        outside.close()

    # From a replica, to the node's address (hairpin: it may land on itself).
    code = (
        f"import socket\nfor _ in range(6):\n"
        f"    c=socket.create_connection(('{gateway}',{port}),timeout=3)\n"
        "    print(c.makefile().readline().strip())\n"
    )
    inside = in_netns(group.attachments["web-1"], sys.executable, "-c", code)
    assert set(inside.stdout.split()) == set(names), inside.stderr

    # The deployment goes: no rule, no chain mentions the port, and it is closed.
    push(overlayd, "shop")
    rules = nft_rules(overlayd)
    assert str(port) not in rules and "pub_shop" not in rules
    with pytest.raises(ConnectionRefusedError):
        greeting("127.0.0.1", port)


def test_gateway_route_carries_the_bridge_mss(make_overlayd: Any) -> None:
    """A node process reaching a published port on the gateway address takes the
    gateway's local route: overlayd gives it the bridge's MSS, not loopback's."""
    overlayd = start_overlayd(make_overlayd)
    gateway = str(overlayd.subnet.network_address + 1)
    mss = int(Path(f"/sys/class/net/{overlayd.bridge}/mtu").read_text()) - 40

    def local_routes() -> list[str]:
        shown = subprocess.run(
            ["ip", "route", "show", "table", "local", f"{gateway}/32"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line for line in shown.splitlines() if line.startswith("local ")]

    assert [f"advmss {mss}" in line for line in local_routes()] == [True], local_routes()
    overlayd.stop()
    overlayd.start()  # found as it should be: left alone, not added twice
    assert [f"advmss {mss}" in line for line in local_routes()] == [True], local_routes()


def test_dropped_backend_gets_no_new_connections_and_keeps_established_ones(
    make_overlayd: Any, replicas: Any
) -> None:
    overlayd = start_overlayd(make_overlayd)
    group: Replicas = replicas(overlayd)
    group.add("api-1")
    group.add("api-2")
    port = free_port()
    endpoints = [tcp_endpoint(port)]
    push(
        overlayd,
        "shop",
        service("shop", "api", [group.backend("api-1", 1), group.backend("api-2", 2)], endpoints),
    )

    # Hold a connection open on api-2.
    held: socket.socket | None = None
    for _ in range(10):
        conn = socket.create_connection(("127.0.0.1", port), timeout=3)
        if conn.makefile().readline().strip() == "api-2":
            held = conn
            break
        conn.close()
    assert held is not None, "no connection reached api-2"
    try:
        push(overlayd, "shop", service("shop", "api", [group.backend("api-1", 1)], endpoints))
        assert {greeting("127.0.0.1", port) for _ in range(12)} == {"api-1"}
        # conntrack keeps the established connection on its backend.
        held.sendall(b"still there\n")
        assert held.recv(100) == b"still there\n"
    finally:
        held.close()

    # No backend at all: the port refuses at once rather than swallowing packets.
    push(overlayd, "shop", service("shop", "api", [], endpoints))
    assert f"tcp dport {port} reject with tcp reset" in nft_rules(overlayd)
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        greeting("127.0.0.1", port)
    assert time.monotonic() - started < 2


def test_udp_port_pins_a_flow_and_honours_the_session_timeout(
    make_overlayd: Any, replicas: Any
) -> None:
    overlayd = start_overlayd(make_overlayd)
    group: Replicas = replicas(overlayd)
    group.add("dns-1")
    group.add("dns-2")
    port = free_port()
    endpoint = {
        "name": "dns",
        "protocol": "udp",
        "port": port,
        "target_port": BACKEND_PORT,
        "expose": "public",
        "stream": {"session_timeout": "17s"},
    }
    push(
        overlayd,
        "infra",
        service("infra", "dns", [group.backend("dns-1", 1), group.backend("dns-2", 2)], [endpoint]),
    )
    assert 'ct timeout set "udp_17s"' in nft_rules(overlayd)

    def flow(count: int) -> list[str]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            answers = []
            for i in range(count):
                sock.sendto(f"q{i}".encode(), ("127.0.0.1", port))
                answers.append(sock.recv(100).decode())
            return answers

    # One socket is one flow: every datagram reaches the same backend.
    answers = flow(5)
    backend = answers[0].split(":")[0]
    assert answers == [f"{backend}:q{i}" for i in range(5)]
    # Many flows reach both.
    assert {flow(1)[0].split(":")[0] for _ in range(8)} == {"dns-1", "dns-2"}

    # The flows carry the session timeout, not the kernel's udp default (30 s / 120 s).
    entries = [
        line
        for line in Path("/proc/net/nf_conntrack").read_text().splitlines()
        if " udp " in line and f"dport={port} " in line
    ]
    assert entries
    for line in entries:
        remaining = int(line.split()[4])
        assert remaining <= 17, line


def test_stream_health_check_takes_a_silent_backend_out(make_overlayd: Any, replicas: Any) -> None:
    overlayd = start_overlayd(make_overlayd, "stream_probe_interval = 0.2\n")
    group: Replicas = replicas(overlayd)
    group.add("db-1")
    group.add("db-2")
    port = free_port()
    endpoint = tcp_endpoint(port, stream={"health_check": {"type": "tcp_connect"}})
    push(
        overlayd,
        "data",
        service("data", "db", [group.backend("db-1", 1), group.backend("db-2", 2)], [endpoint]),
    )
    assert {greeting("127.0.0.1", port) for _ in range(6)} == {"db-1", "db-2"}

    group.kill("db-2")  # the replica is still pushed as in rotation; only the probe sees it
    deadline = time.monotonic() + 10
    while "mod 2" in nft_rules(overlayd) and time.monotonic() < deadline:
        time.sleep(0.1)
    only = rf"tcp dport {port} dnat (ip )?to {group.attachments['db-1'].address}:8080"
    assert re.search(only, nft_rules(overlayd))
    assert {greeting("127.0.0.1", port) for _ in range(6)} == {"db-1"}

    group.serve("db-2")
    deadline = time.monotonic() + 10
    while "mod 2" not in nft_rules(overlayd) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {greeting("127.0.0.1", port) for _ in range(6)} == {"db-1", "db-2"}


def test_port_conflicts_and_bad_pushes_are_refused_with_a_sentence(
    make_overlayd: Any, replicas: Any
) -> None:
    overlayd = start_overlayd(make_overlayd)
    group: Replicas = replicas(overlayd)
    group.add("a-1")
    port = free_port()
    push(overlayd, "alpha", service("alpha", "a", [group.backend("a-1", 1)], [tcp_endpoint(port)]))
    before = nft_rules(overlayd)

    with pytest.raises(ConflictError) as caught:
        push(overlayd, "beta", service("beta", "b", [], [tcp_endpoint(port)]))
    message = str(caught.value)
    assert f"tcp port {port}" in message and "'alpha'" in message, message
    assert "\n" not in message and "Traceback" not in message
    assert nft_rules(overlayd) == before
    # udp on the same number is another port.
    udp = dict(tcp_endpoint(port), protocol="udp")
    push(overlayd, "beta", service("beta", "b", [group.backend("a-1", 1)], [udp]))
    assert f"udp dport {port}" in nft_rules(overlayd)

    for deployment, text, words in [
        ("gamma", "{not json", "not a DeploymentTraffic"),
        ("gamma", encode(DeploymentTraffic(deployment="delta")), "'delta'"),
        (
            "gamma",
            encode(
                DeploymentTraffic(
                    deployment="gamma",
                    services=[
                        ServiceTraffic(
                            deployment="gamma",
                            service="g",
                            backends=[
                                Backend(replica="g-1", instance=1, revision=1, address="x; y")
                            ],
                        )
                    ],
                )
            ),
            "not an IPv4 address",
        ),
    ]:
        with pytest.raises(InvalidArgumentError) as bad:
            overlayd.call("set_traffic", deployment, text)
        assert words in str(bad.value) and "\n" not in str(bad.value), str(bad.value)
    assert "gamma" not in nft_rules(overlayd)


def test_published_ports_survive_a_restart_and_remove_network_takes_them(
    make_overlayd: Any, replicas: Any
) -> None:
    overlayd = start_overlayd(make_overlayd)
    group: Replicas = replicas(overlayd)
    group.add("keep-1")
    port = free_port()
    push(overlayd, "keep", service("keep", "k", [group.backend("keep-1", 1)], [tcp_endpoint(port)]))
    overlayd.stop()
    assert greeting("127.0.0.1", port) == "keep-1"  # the rules outlive the daemon
    overlayd.start()
    assert f"tcp dport {port}" in nft_rules(overlayd)
    assert greeting("127.0.0.1", port) == "keep-1"
    assert re.search(r"zlayer_overlay_published_ports 1\.0", overlayd.metrics())

    group.close()
    group.attachments.clear()
    overlayd.stop()
    result = overlayd.remove_network()
    assert result.returncode == 0, result.stderr
    state = overlayd.paths.daemon_state("overlayd")
    assert not (state / "traffic").exists()
    # Started again on a clean node, nothing of the old deployment comes back.
    overlayd.start()
    assert f"tcp dport {port}" not in nft_rules(overlayd)
