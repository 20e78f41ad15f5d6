"""The mesh between two real overlayds: real wireguard-go, real namespaces, real traffic.

Two network namespaces stand for two nodes joined by one veth pair (their
shared network). Each runs its own zlayer-overlayd (``ip netns exec``) on a
private bus and prefix of its own; each is given the other's block with its
WireGuard key and endpoint through ``SyncTraffic``, as schedd sends them. A
replica network on each block then reaches the other through the mesh, and a
capture on the shared network finds only WireGuard's UDP there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ctl.supervisor import find_executable
from daemons.overlayd import plumbing
from daemons.overlayd.mesh import interface_name
from shared.bus import open_bus
from shared.busdaemon import PrivateBus
from shared.clients import OverlayClient
from shared.mesh import keys
from shared.mesh.device import Changes, PeerConfig
from shared.mesh.uapi import UapiClient
from shared.paths import PREFIX_ENV, Paths
from shared.wire.agent import SyncResult
from shared.wire.mesh import MeshStatus
from shared.wire.overlay import Attachment
from shared.wire.traffic import PeerBlock, TrafficViews
from tests.conftest import kill_prefix_processes, write_test_config
from tests.integration.test_daemon import NotifyListener, start, stop

_missing = [t for t in ("ip", "nft", "busybox", "wireguard-go", "tcpdump") if not shutil.which(t)]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, veths and WireGuard need root"),
    pytest.mark.skipif(
        bool(_missing),
        reason=f"missing {', '.join(_missing)} "
        "(apt-get install iproute2 nftables busybox-static wireguard-go tcpdump)",
    ),
]

T = TypeVar("T")
PORT = 51820
_counter = itertools.count()
_generation = itertools.count(1)

# A replica-side TCP peer, run inside a namespace: "serve PORT" echoes lines and, for
# a connection that starts with "BULK\n", answers the sha256 and length of the rest;
# "send ADDRESS PORT SIZE" sends SIZE seeded bytes and prints the answer;
# "talk ADDRESS PORT" relays stdin lines to the server and prints each echo.
PEER = r"""
import hashlib, random, socket, sys, threading
mode = sys.argv[1]
if mode == "serve":
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(sys.argv[2])))
    server.listen()
    print("listening", flush=True)
    def handle(conn):
        f = conn.makefile("rb")
        first = f.readline()
        if first == b"BULK\n":
            digest, size = hashlib.sha256(), 0
            while chunk := f.read(65536):
                digest.update(chunk)
                size += len(chunk)
            conn.sendall(f"{digest.hexdigest()} {size}\n".encode())
        else:
            line = first
            while line:
                conn.sendall(line)
                line = f.readline()
        conn.close()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
elif mode == "send":
    data = random.Random(7).randbytes(int(sys.argv[4]))
    conn = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=60)
    conn.sendall(b"BULK\n" + data)
    conn.shutdown(socket.SHUT_WR)
    answer = conn.makefile("rb").readline().decode().strip()
    print(answer, hashlib.sha256(data).hexdigest(), len(data))
else:
    conn = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=60)
    f = conn.makefile("rb")
    for line in sys.stdin:
        conn.sendall(line.encode())
        print(f.readline().decode().strip(), flush=True)
"""


def netns_run(netns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout
    )


class MeshNode:
    """One node: a namespace for its host, and the overlayd running in it."""

    def __init__(self, name: str, paths: Paths, netns: str, underlay: str, third: int) -> None:
        self.name = name
        self.paths = paths
        self.netns = netns
        self.underlay = underlay  # its address on the shared network
        n = next(_counter)
        self.bridge = f"zlm{os.getpid() % 10000}{name}{n}"
        self.subnet = f"10.237.{third}.0/24"
        self.interface = interface_name(self.bridge)
        paths.daemon_config("overlayd").write_text(
            f'metrics_port = 0\nbridge = "{self.bridge}"\nsubnet = "{self.subnet}"\n'
        )
        self.bus = PrivateBus(paths.prefix / "bus.sock")
        self.bus.start()
        self.notify = NotifyListener(paths.prefix / "notify.sock")
        self.process: subprocess.Popen[str] | None = None
        self.logs = ""

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ZLAYER_BUS_ADDRESS": self.bus.address,
            PREFIX_ENV: str(self.paths.prefix),
        }

    @property
    def wrapper(self) -> tuple[str, ...]:
        # nsenter, not ip netns exec: that one gives overlayd a mount namespace of
        # its own, and the replica namespaces it mounts would be invisible outside.
        return ("nsenter", f"--net=/run/netns/{self.netns}")

    def start(self) -> None:
        self.notify.messages.clear()
        self.process = start(
            "overlayd",
            self.bus,
            self.notify,
            wrapper=self.wrapper,
            **{PREFIX_ENV: str(self.paths.prefix)},
        )
        try:
            self.notify.wait_for("READY=1", timeout=30)
        except AssertionError:
            code, err = stop(self.process)
            self.process = None
            raise AssertionError(f"overlayd {self.name} did not start ({code}): {err}") from None

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        code, err = stop(self.process, signal_first=not kill)
        self.process = None
        self.logs += err
        assert kill or code == 0, err
        assert "Traceback" not in err, err

    def remove_network(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.wrapper, find_executable("zlayer-overlayd"), "--remove-network"],
            capture_output=True, text=True, timeout=60, env=self.env,
        )  # fmt: skip

    def ask(self, call: Callable[[OverlayClient], Awaitable[T]]) -> T:
        async def run() -> T:
            bus = open_bus(self.bus.address)
            try:
                return await call(OverlayClient(bus))
            finally:
                bus.close()

        return asyncio.run(run())

    def enable_mesh(self) -> MeshStatus:
        return self.ask(lambda c: c.enable_mesh(PORT))

    def mesh(self) -> MeshStatus:
        return self.ask(lambda c: c.get_mesh())

    def rotate(self) -> MeshStatus:
        return self.ask(lambda c: c.rotate_mesh_key())

    def block(self) -> PeerBlock:
        """This node as the other is told of it (schedd's PeerBlock)."""
        return PeerBlock(
            node=self.name,
            subnet=self.subnet,
            address=self.underlay,
            wireguard_key=self.mesh().public_key,
            endpoint=f"{self.underlay}:{PORT}",
        )

    def sync(self, peers: list[PeerBlock]) -> SyncResult:
        views = TrafficViews(generation=next(_generation), peers=peers)
        result = self.ask(lambda c: c.sync_traffic(views))
        assert result.accepted, result
        return result

    def attach(self, container_id: str) -> Attachment:
        return self.ask(lambda c: c.attach(container_id, container_id))

    def metrics(self) -> str:
        """Scraped from inside the node's namespace, where overlayd serves them."""
        status = self.ask(lambda c: c.status())
        scraped = netns_run(self.netns, "curl", "-sSf", "--max-time", "10", status.metrics_url)
        assert scraped.returncode == 0, scraped.stderr
        return scraped.stdout

    def wireguard_pid(self) -> int:
        return int((self.paths.daemon_state("overlayd") / "wireguard-go.pid").read_text())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(kill=True)
        self.bus.stop()
        self.notify.close()


def _pid() -> int:
    return os.getpid() % 10000


@pytest.fixture(scope="module", autouse=True)
def _netns_dir() -> None:
    if os.geteuid() == 0:
        plumbing.prepare_netns_dir()


@pytest.fixture
def two_nodes(zlayer_prefix: Paths) -> Iterator[tuple[MeshNode, MeshNode]]:
    """Nodes a and b, their hosts joined by one veth pair (10.236.0.1 and .2/24)."""
    tag = f"{_pid()}x{next(_counter)}"
    hosts = (f"zlmha{tag}", f"zlmhb{tag}")
    second = Paths(Path(f"/tmp/zlt-{os.getpid()}-{time.monotonic_ns() % 10**9}b"))
    second.prefix.mkdir()
    write_test_config(second)
    nodes: list[MeshNode] = []
    try:
        for host in hosts:
            subprocess.run(["ip", "netns", "add", host], check=True)
        subprocess.run(
            ["ip", "link", "add", "ul0", "netns", hosts[0], "type", "veth",
             "peer", "name", "ul0", "netns", hosts[1]],
            check=True,
        )  # fmt: skip
        for host, address in zip(hosts, ("10.236.0.1", "10.236.0.2"), strict=True):
            for script in ("ip link set lo up", f"ip addr add {address}/24 dev ul0",
                           "ip link set ul0 up"):  # fmt: skip
                subprocess.run(["ip", "netns", "exec", host, "sh", "-c", script], check=True)
        nodes.append(MeshNode("a", zlayer_prefix, hosts[0], "10.236.0.1", 1))
        nodes.append(MeshNode("b", second, hosts[1], "10.236.0.2", 2))
        yield nodes[0], nodes[1]
    finally:
        failures = []
        for node in nodes:
            node.stop(kill=True)
            removed = node.remove_network()
            if removed.returncode != 0:
                failures.append(removed.stderr)
            node.close()
        kill_prefix_processes(second.prefix)
        for host in hosts:
            subprocess.run(["ip", "netns", "del", host], check=False)
        shutil.rmtree(second.prefix, ignore_errors=True)
        assert not failures, failures


def serve(netns: str, port: int) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", PEER, "serve", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    return server


def netns_of(attachment: Attachment) -> str:
    return Path(attachment.netns).name


def ping(attachment: Attachment, address: str, deadline: float = 10.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if (
            netns_run(netns_of(attachment), "busybox", "ping", "-c1", "-W1", address).returncode
            == 0
        ):
            return True
    return False


def connect(a: MeshNode, b: MeshNode) -> None:
    """Each node told of the other, as schedd's traffic view tells them."""
    a.sync([b.block()])
    b.sync([a.block()])


# ---------------------------------------------------------------- tests


def test_two_nodes_talk_through_the_mesh_and_only_wireguard_crosses(
    two_nodes: tuple[MeshNode, MeshNode], tmp_path: Path
) -> None:
    a, b = two_nodes
    a.start()
    b.start()
    off = a.mesh()
    assert not off.enabled and off.reason
    status = a.enable_mesh()
    assert status.enabled and status.interface == a.interface
    assert status.implementation == "wireguard-go"
    assert status.listen_port == PORT and status.address == "10.237.1.1"
    assert status.mtu == 1420, "the shared network's 1500 less WireGuard's 80"
    assert len(status.public_key) == 44
    key = a.paths.daemon_state("overlayd") / "mesh.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert a.enable_mesh().public_key == status.public_key, "idempotent, same key"
    b.enable_mesh()
    connect(a, b)

    ra, rb = a.attach("ra"), b.attach("rb")
    capture = tmp_path / "underlay.pcap"
    dump = subprocess.Popen(
        ["ip", "netns", "exec", a.netns, "tcpdump", "-i", "ul0", "-nn", "-U", "--immediate-mode",
         "-w", str(capture)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    syns = tmp_path / "mesh.pcap"  # inside the tunnel, on a's mesh interface
    inner = subprocess.Popen(
        ["ip", "netns", "exec", a.netns, "tcpdump", "-i", a.interface, "-nn", "-U",
         "--immediate-mode", "-w", str(syns), "tcp[tcpflags] & tcp-syn != 0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = serve(netns_of(rb), 5001)
    try:
        time.sleep(1)  # tcpdump opens its socket
        assert ping(ra, rb.address), "a replica on a reaches one on b through the mesh"
        assert ping(rb, ra.address)
        size = 4 << 20
        sent = netns_run(
            netns_of(ra), sys.executable, "-c", PEER, "send", rb.address, "5001", str(size),
            timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        got_digest, got_size, digest, length = sent.stdout.split()
        assert (got_digest, int(got_size)) == (digest, int(length)) == (digest, size), "intact"
    finally:
        server.kill()
        server.wait()
        time.sleep(0.5)
        for capturing in (dump, inner):
            capturing.send_signal(signal.SIGINT)
            capturing.wait(timeout=10)

    def read(expression: str, pcap: Path = capture) -> list[str]:
        out = subprocess.run(
            ["tcpdump", "-r", str(pcap), "-nn", expression],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return out.stdout.splitlines()

    wireguard = read(f"udp port {PORT}")
    assert len(wireguard) > 1000, "the 4 MB went as WireGuard packets between the nodes"
    assert all("10.236.0." in line for line in wireguard[:50])
    plain = read(f"ip and not (udp port {PORT})")
    assert plain == [], f"replica traffic crossed the shared network in the clear: {plain[:5]}"
    assert read("net 10.237.0.0/16") == []
    # No IP fragments: the MTU and the clamped MSS keep every packet whole.
    assert read("ip[6:2] & 0x3fff != 0") == []
    # The replicas' veths are 1500 bytes: their SYNs (and the answers) enter the
    # tunnel with the MSS of its 1420-byte MTU, not the 1460 they were sent with.
    handshake = read("", syns)
    assert len(handshake) >= 2 and all("mss 1380" in line for line in handshake), handshake

    seen = a.mesh()
    (peer,) = seen.peers
    assert peer.public_key == b.mesh().public_key and peer.allowed_ips == ["10.237.2.0/24"]
    assert peer.endpoint == f"10.236.0.2:{PORT}"
    assert peer.last_handshake > time.time() - 120 and peer.tx_bytes > 4 << 20
    # A block without a key keeps its plain route beside the mesh's; adding a peer
    # leaves b's session alone.
    routes = netns_run(a.netns, "ip", "route").stdout
    assert f"10.237.2.0/24 dev {a.interface} proto 91 src 10.237.1.1" in routes
    other = keys.public_of(keys.generate_private())
    a.sync(
        [
            b.block(),
            PeerBlock(node="c", subnet="10.237.3.0/24", address="10.236.0.2"),
            PeerBlock(node="d", subnet="10.237.4.0/24", address="10.236.0.9", wireguard_key=other),
        ]
    )
    routes = netns_run(a.netns, "ip", "route").stdout
    assert "10.237.3.0/24 via 10.236.0.2 dev ul0 proto 90" in routes, routes
    assert f"10.237.4.0/24 dev {a.interface} proto 91" in routes, routes
    after = {p.public_key: p for p in a.mesh().peers}
    assert set(after) == {peer.public_key, other}
    assert after[peer.public_key].last_handshake == peer.last_handshake
    assert after[other].endpoint == "" and after[other].allowed_ips == ["10.237.4.0/24"]
    a.sync([b.block()])
    assert [p.public_key for p in a.mesh().peers] == [peer.public_key]
    assert "10.237.4.0/24" not in netns_run(a.netns, "ip", "route").stdout

    metrics = a.metrics()
    assert "zlayer_overlayd_mesh_peers 1.0" in metrics
    match = re.search(
        r'zlayer_overlayd_mesh_peer_last_handshake_seconds\{peer="b"\} (\S+)', metrics
    )
    assert match and float(match.group(1)) > time.time() - 120, metrics
    assert re.search(r'zlayer_overlayd_mesh_peer_transmitted_bytes_total\{peer="b"\} \d', metrics)
    assert re.search(r'zlayer_overlayd_mesh_peer_received_bytes_total\{peer="b"\} \d', metrics)


def test_a_connection_survives_a_key_rotation(two_nodes: tuple[MeshNode, MeshNode]) -> None:
    a, b = two_nodes
    a.start()
    b.start()
    a.enable_mesh()
    b.enable_mesh()
    connect(a, b)
    ra, rb = a.attach("ra"), b.attach("rb")
    server = serve(netns_of(rb), 5002)
    client = subprocess.Popen(
        ["ip", "netns", "exec", netns_of(ra), sys.executable, "-c", PEER, "talk", rb.address,
         "5002"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None

    def echo(line: str) -> str:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(line + "\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        assert echo("before") == "before"
        old = a.mesh().public_key
        rotated = a.rotate()
        assert rotated.public_key != old and rotated.enabled
        assert rotated.peers, "the peers stay"
        b.sync([a.block()])  # b is given a's new key
        assert echo("after") == "after", "the open connection goes on with the new key"
        (peer,) = b.mesh().peers
        assert peer.public_key == rotated.public_key
        assert (a.paths.daemon_state("overlayd") / "mesh.key").read_text().strip() != ""
    finally:
        client.kill()
        client.wait()
        server.kill()
        server.wait()


def test_the_mesh_survives_restarts_and_goes_with_the_network(
    two_nodes: tuple[MeshNode, MeshNode],
) -> None:
    a, b = two_nodes
    a.start()
    b.start()
    key = a.enable_mesh().public_key
    b.enable_mesh()
    connect(a, b)
    ra, rb = a.attach("ra"), b.attach("rb")
    assert ping(ra, rb.address)

    # b is seen at another of its addresses (as handshakes from behind a NAT would
    # show it): a restart must not put the configured endpoint back.
    subprocess.run(
        ["ip", "netns", "exec", b.netns, "ip", "addr", "add", "10.236.0.3/24", "dev", "ul0"],
        check=True,
    )
    b_key = b.mesh().public_key
    roamed = PeerConfig(b_key, f"10.236.0.3:{PORT}", ("10.237.2.0/24",), 0)
    device = UapiClient(Path("/var/run/wireguard", f"{a.interface}.sock"))
    device.set(Changes(upsert=(roamed,), with_endpoint=frozenset({b_key})))

    # A plain restart: wireguard-go keeps serving, and is found again.
    first = a.wireguard_pid()
    a.stop()
    assert ping(ra, rb.address), "the mesh carries traffic while overlayd is away"
    a.start()
    assert a.wireguard_pid() == first
    assert a.mesh().public_key == key
    assert [p.endpoint for p in a.mesh().peers] == [f"10.236.0.3:{PORT}"], "kept"

    # wireguard-go killed under a running overlayd: it is started again.
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if a.wireguard_pid() != first and a.mesh().enabled:
                break
        time.sleep(0.2)
    assert a.wireguard_pid() != first, "overlayd brings a killed wireguard-go back"
    assert ping(ra, rb.address)
    assert a.mesh().public_key == key
    first = a.wireguard_pid()

    # overlayd and wireguard-go killed outright: a stale socket is left behind.
    a.stop(kill=True)
    os.kill(first, signal.SIGKILL)
    socket_path = Path("/var/run/wireguard", f"{a.interface}.sock")
    deadline = time.monotonic() + 5
    while Path(f"/proc/{first}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert socket_path.exists(), "wireguard-go killed leaves its socket"
    a.start()
    assert a.wireguard_pid() != first
    status = a.mesh()
    assert status.enabled and status.public_key == key, "same key after the restart"
    assert [p.allowed_ips for p in status.peers] == [["10.237.2.0/24"]], "same peers"
    assert ping(ra, rb.address), "the mesh is back without a new view from schedd"

    # --remove-network takes the interface away and stops wireguard-go.
    pid = a.wireguard_pid()
    a.stop()
    removed = a.remove_network()
    assert removed.returncode == 0, removed.stderr
    assert f"the mesh interface {a.interface}" in removed.stderr
    assert (
        not Path(f"/proc/{pid}").exists()
        or b"wireguard" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    assert not socket_path.exists()
    links = netns_run(a.netns, "ip", "-o", "link").stdout
    assert a.interface not in links
    assert not (a.paths.daemon_state("overlayd") / "mesh.key").exists()
