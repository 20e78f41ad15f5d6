"""The kernel L4 path: a published tcp port against connecting to the backend directly.

Starts zlayer-overlayd alone on a private bus under a fresh temporary prefix
(on a bridge and free /24 of its own; with the other daemons, schedd's full
views would take back traffic and namespaces pushed by hand), attaches two
replica namespaces through ``Attach`` and pushes one deployment with
``SetTraffic``. Each way below has a busybox ``httpd`` of its
own (a 64-byte page and a 1 MiB file) on a backend port of its own, so no two
ways ever present the same address and port pair to a backend:

- **direct to the backend (peer)**: the replica's address, no NAT (conntrack
  still tracks it, as it does every connection on a node with a NAT table);
- **direct, untracked**: the same with a ``notrack`` rule, i.e. what
  conntrack itself costs;
- **hand-written DNAT**: one ``dnat to`` rule in an nft table of the
  benchmark's own (and one ``masquerade`` for 127.0.0.1), i.e. what the
  kernel's NAT costs with the smallest rule set there is;
- **published port**: overlayd's table, on 127.0.0.1 and on the node's bridge
  address, and the port whose map round-robins over both replicas.

A client on the node connecting to one of the node's own addresses gets a
socket routed through loopback; on 127.0.0.1 that route is loopback's own
(MSS 65483 against the bridge's 1460), which is what the 127.0.0.1 ways'
CPU per MiB shows, hand-written or not. overlayd gives the bridge address's
local route the bridge's MSS, so that way does not pay it.

``wrk`` (2 threads, ``--connections``, ``--duration`` seconds) measures each
way in turn, ``--rounds`` times, the order reversed every other round;
figures are medians over the rounds, and each ratio is the median of the
rounds' own ratios (a way against the peer in the same round):

- **connection rate**: requests/s for the 64-byte page. busybox httpd
  answers one request per connection and closes it, so each request is a new
  TCP connection (a new conntrack entry, one pass through the NAT rules);
- **throughput**: transfer/s of the 1 MiB file (connections kept);
- **CPU per unit**: the CPU time wrk and the way's httpd used (user and
  system, which holds the softirq work of these local paths) per 1000
  connections and per 100 MiB. wrk and the servers share the machine with
  whatever else runs, which moves rates between runs; CPU per unit moves far
  less, so it is the figure to read when the machine is busy.

Two things the benchmark avoids, because they are neither path's cost:

- busybox httpd listens with a backlog of 9; more connections than that
  overflow it and each dropped SYN costs a 1 s retransmission (hence 8
  connections by default);
- the backend closes first, so it holds the TIME_WAIT of every connection,
  and one client making thousands of connections a second reuses its ports
  within that minute. This kernel starts every connection's TCP timestamps
  at a random offset, so a SYN that meets a TIME_WAIT fails the PAWS check
  about half the time and waits 1 s too. The replica namespaces get
  ``net.ipv4.tcp_timestamps=0`` (a reused port is then accepted on its
  sequence number). The ``refused SYNs`` column counts the backend's PAWS
  rejects and listen overflows per way, so a run shows it stayed at zero.

Clean-up, also on an error, Ctrl-C or SIGTERM: the servers killed by their
PIDs, the benchmark's nft table deleted, the deployment's traffic removed,
the namespaces detached, overlayd stopped by its PID, then
``zlayer-overlayd --remove-network``, the bus stopped and the prefix removed.

Needs root, wrk, nft and busybox-static. Run:
``.venv/bin/python bench/l4_kernel.py`` (about 3 minutes; ``--rounds 8`` for
steadier rates on a busy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import print_table
from replica_start import free_subnets

from ctl.supervisor import find_executable
from shared.bus import BUS_ADDRESS_ENV, open_bus
from shared.busdaemon import PrivateBus
from shared.clients import OverlayClient
from shared.paths import PREFIX_ENV, Paths
from shared.wire import decode, encode
from shared.wire.overlay import Attachment
from shared.wire.traffic import Backend, DeploymentTraffic, ServiceTraffic

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
SMALL = "small.html"
BIG = "big.bin"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Backend ports, one per way (a way's httpd listens on its own).
PORT_DIRECT, PORT_UNTRACKED, PORT_HAND_LO, PORT_PUB_LO = 8080, 8081, 8082, 8083
PORT_HAND_NODE, PORT_PUB_NODE, PORT_PUB_TWO = 8084, 8085, 8086


@dataclass(frozen=True)
class Method:
    rounds: int
    duration: int
    connections: int
    own_ports: bool  # one backend port per way (else all share one, as a naive run would)
    timestamps: bool  # keep TCP timestamps on in the replica namespaces


@dataclass
class Way:
    name: str
    host: str
    port: int
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    conn_cpu: list[float] = field(default_factory=list)  # CPU seconds per connection
    throughput: list[float] = field(default_factory=list)
    byte_cpu: list[float] = field(default_factory=list)  # CPU seconds per byte
    refused: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def call(bus_address: str, method: str, *args: Any) -> Any:
    async def run() -> Any:
        bus = open_bus(bus_address)
        try:
            return await getattr(OverlayClient(bus)._proxy, method)(*args)
        finally:
            bus.close()

    return asyncio.run(run())


@contextlib.contextmanager
def running_overlayd(bridge: str, subnet: str) -> Iterator[str]:
    """zlayer-overlayd alone on a private bus under a fresh prefix; yields the bus address.

    Alone, because the kernel path needs nothing else, and because with the
    other daemons schedd's full views take back traffic and namespaces that
    no deployment of its own holds (this benchmark pushes them by hand).
    Always cleaned up: overlayd stopped by its PID, ``--remove-network``,
    the bus stopped and the prefix removed.
    """
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    prefix = Path(tempfile.mkdtemp(prefix="zlbench-l4-", dir="/tmp"))
    paths = Paths(prefix)
    paths.daemon_config("overlayd").parent.mkdir(parents=True, exist_ok=True)
    paths.daemon_config("overlayd").write_text(
        f'metrics_port = 0\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
    )
    bus = PrivateBus(paths.bus_socket)
    env = {k: v for k, v in os.environ.items() if k != BUS_ADDRESS_ENV}
    env[PREFIX_ENV] = str(prefix)
    daemon: subprocess.Popen[bytes] | None = None
    log = prefix / "overlayd.log"
    try:
        env[BUS_ADDRESS_ENV] = bus.start()
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                [find_executable("zlayer-overlayd")], env=env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                call(bus.address, "get_network")
                break
            except Exception:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"zlayer-overlayd did not start: {log.read_text().strip()}"
                    ) from None
                time.sleep(0.2)
        yield bus.address
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if daemon is not None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            remove_network(env)
            bus.stop()
            shutil.rmtree(prefix, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


def _sigterm_to_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@dataclass(frozen=True)
class Run:
    requests: int
    bytes: float
    seconds: float
    cpu: float  # wrk's and the way's servers', in seconds


def wrk(url: str, duration: int, connections: int) -> subprocess.CompletedProcess[str]:
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", url]
    for _ in range(2):  # once more if wrk's own first connect was unlucky
        done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
        if done.returncode == 0:
            return done
    raise RuntimeError(f"{' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")


def measure_once(way: Way, path: str, method: Method, netns: str) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    served = server_cpu(way.servers)
    refused = backend_refusals(netns)
    out = wrk(f"{way.url}/{path}", method.duration, method.connections).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    way.refused += backend_refusals(netns) - refused
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    cpu += server_cpu(way.servers) - served
    count = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    read = re.search(r"([\d.]+)([KMG]?B) read", out)
    if count is None or read is None:
        raise RuntimeError(f"wrk printed no figures: {out.strip()}")
    seconds = float(count.group(2)) / (1000 if count.group(3) == "ms" else 1)
    scale = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[read.group(2)]
    return Run(int(count.group(1)), float(read.group(1)) * scale, seconds, cpu)


def server_cpu(servers: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds of the httpd processes and of their reaped children."""
    total = 0
    for server in servers:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def backend_refusals(netns: str) -> int:
    """SYNs the backend's namespace turned away (PAWS in TIME_WAIT, full accept queue)."""
    text = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/proc/net/netstat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for header, values in zip(text[::2], text[1::2], strict=False):
        if header.startswith("TcpExt:"):
            row = dict(zip(header.split()[1:], values.split()[1:], strict=True))
            return int(row["PAWSTimewait"]) + int(row["ListenOverflows"])
    return 0


def free_ports(count: int) -> list[int]:
    """Node ports nothing listens on now (the published ports)."""
    listening = subprocess.run(["ss", "-Htan"], capture_output=True, text=True).stdout
    used = {int(m) for m in re.findall(r":(\d+)\s", listening)}
    base = 24000 + os.getpid() % 1000
    return [p for p in range(base, base + 100) if p not in used][:count]


def remove_network(env: dict[str, str]) -> None:
    removed = subprocess.run(
        [find_executable("zlayer-overlayd"), "--remove-network"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if removed.returncode != 0:
        print(f"zlayer-overlayd --remove-network: {removed.stderr.strip()}", file=sys.stderr)


def nft(text: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=text, text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"nft -f refused the benchmark's table: {done.stderr.strip()}")


@contextlib.contextmanager
def hand_table(
    name: str,
    bridge: str,
    gateway: IPv4Address,
    backend: IPv4Address,
    node_ports: tuple[int, int],
    backend_ports: tuple[int, int],
    untracked: int | None,
) -> Iterator[None]:
    """The peers' rules: the smallest DNAT there is, and notrack for the untracked way.

    ``node_ports`` are the hand-written ways' ports (127.0.0.1, node address),
    ``backend_ports`` where each lands. The NAT chains run just before
    overlayd's (priority -101 and 99), so a hand-written way's connection is
    translated here and never walks overlayd's chains.
    """
    lo, node = node_ports
    lo_target, node_target = backend_ports
    raw = ""
    if untracked is not None:
        raw = f"""    chain raw_prerouting {{
        type filter hook prerouting priority raw; policy accept;
        ip saddr {backend} tcp sport {untracked} notrack
    }}
    chain raw_output {{
        type filter hook output priority raw; policy accept;
        ip daddr {backend} tcp dport {untracked} notrack
    }}
"""
    nft(
        f"""table ip {name} {{
{raw}    chain output {{
        type nat hook output priority -101; policy accept;
        ip daddr 127.0.0.1 tcp dport {lo} dnat to {backend}:{lo_target}
        ip daddr {gateway} tcp dport {node} dnat to {backend}:{node_target}
    }}
    chain postrouting {{
        type nat hook postrouting priority 99; policy accept;
        oifname "{bridge}" ip saddr 127.0.0.0/8 ip daddr {backend} tcp dport {lo_target} masquerade
    }}
}}
"""
    )
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "ip", name], capture_output=True, check=False)


def httpd(netns: str, port: int, www: Path) -> subprocess.Popen[bytes]:
    # ip netns exec execs the command: the Popen's pid is httpd's.
    command = ["busybox", "httpd", "-f", "-p", str(port), "-h", str(www)]
    return subprocess.Popen(["ip", "netns", "exec", netns, *command])


def measure(bus: str, work: Path, bridge: str, method: Method) -> list[Way]:
    www = work / "www"
    www.mkdir()
    (www / SMALL).write_text("x" * 63 + "\n")
    (www / BIG).write_bytes(os.urandom(2**20))
    attached: list[Attachment] = []
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("bench-l4-1", "bench-l4-2"):
            attachment = decode(call(bus, "attach", name, name), Attachment)
            attached.append(attachment)
            if not method.timestamps:
                subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        Path(attachment.netns).name,
                        "sysctl",
                        "-qw",
                        "net.ipv4.tcp_timestamps=0",
                    ],
                    check=True,
                )
        netns = [Path(a.netns).name for a in attached]
        backend, gateway = IPv4Address(attached[0].address), IPv4Address(attached[0].gateway)
        pub_lo, pub_node, pub_two, hand_lo, hand_node = free_ports(5)
        # (way, backend port if each way has its own)
        plan = [
            (Way("direct to the backend (peer)", str(backend), PORT_DIRECT), PORT_DIRECT),
            (Way("direct, untracked (notrack)", str(backend), PORT_UNTRACKED), PORT_UNTRACKED),
            (Way("hand-written DNAT, 127.0.0.1", "127.0.0.1", hand_lo), PORT_HAND_LO),
            (Way("published port, 127.0.0.1", "127.0.0.1", pub_lo), PORT_PUB_LO),
            (
                Way("hand-written DNAT, node bridge address", str(gateway), hand_node),
                PORT_HAND_NODE,
            ),
            (Way("published port, node bridge address", str(gateway), pub_node), PORT_PUB_NODE),
            (Way("published port, 2 backends, 127.0.0.1", "127.0.0.1", pub_two), PORT_PUB_TWO),
        ]
        if not method.own_ports:
            # One port for all: the untracked way cannot be told apart, so it goes.
            plan = [(way, PORT_DIRECT) for way, port in plan if port != PORT_UNTRACKED]
        ports = {way.name: port for way, port in plan}
        ways = [way for way, _ in plan]
        shared: dict[tuple[str, int], subprocess.Popen[bytes]] = {}

        def server(ns: str, port: int) -> subprocess.Popen[bytes]:
            if (ns, port) not in shared:
                shared[(ns, port)] = httpd(ns, port, www)
            return shared[(ns, port)]

        for way in ways:
            way.servers.append(server(netns[0], ports[way.name]))
        ways[-1].servers.append(server(netns[1], ports[ways[-1].name]))
        servers = list(shared.values())

        backends = [
            Backend(replica=a.container_id, instance=i + 1, revision=1, address=a.address)
            for i, a in enumerate(attached)
        ]

        def service(name: str, way: Way, count: int) -> ServiceTraffic:
            endpoint = {
                "name": "http",
                "protocol": "tcp",
                "port": way.port,
                "target_port": ports[way.name],
                "expose": "public",
            }
            return ServiceTraffic(
                deployment="bench", service=name, endpoints=[endpoint], backends=backends[:count]
            )

        by_port = {way.port: way for way in ways}
        traffic = DeploymentTraffic(
            deployment="bench",
            services=[
                service("lo", by_port[pub_lo], 1),
                service("node", by_port[pub_node], 1),
                service("two", by_port[pub_two], 2),
            ],
        )
        call(bus, "set_traffic", "bench", encode(traffic))
        table = f"zlbench_l4_{os.getpid()}"
        hand_ports = (ports[by_port[hand_lo].name], ports[by_port[hand_node].name])
        untracked = PORT_UNTRACKED if method.own_ports else None
        with hand_table(
            table, bridge, gateway, backend, (hand_lo, hand_node), hand_ports, untracked
        ):
            for way in ways:  # up and answering, and warm
                wrk(f"{way.url}/{SMALL}", 1, method.connections)
                wrk(f"{way.url}/{BIG}", 1, method.connections)
            for way in ways:
                way.refused = 0
            for round_ in range(method.rounds):
                order = ways if round_ % 2 == 0 else ways[::-1]
                for way in order:
                    run = measure_once(way, SMALL, method, netns[0])
                    way.rates.append(run.requests / run.seconds)
                    way.conn_cpu.append(run.cpu / run.requests)
                for way in order:
                    run = measure_once(way, BIG, method, netns[0])
                    way.throughput.append(run.bytes / run.seconds)
                    way.byte_cpu.append(run.cpu / run.bytes)
        removal = encode(DeploymentTraffic(deployment="bench"))
        call(bus, "set_traffic", "bench", removal)
        return ways
    finally:
        for process in servers:
            process.kill()
            process.wait()
        for attachment in attached:
            with contextlib.suppress(Exception):
                call(bus, "detach", attachment.container_id)


def ratio(first: list[float], second: list[float]) -> float:
    """The median over the rounds of second / first, each round's pair taken together
    (they ran minutes apart at most, so a busy spell of the machine cancels out)."""
    return statistics.median(b / a for a, b in zip(first, second, strict=True))


def report(ways: list[Way], method: Method) -> None:
    med = statistics.median
    peer = ways[0]
    ports = "one backend port per way" if method.own_ports else "one backend port for all ways"
    stamps = "TCP timestamps on" if method.timestamps else "TCP timestamps off"
    print(
        f"\nwrk -t2 -c{method.connections} -d{method.duration}s, {method.rounds} rounds "
        "(medians; ratios are medians of each round's own; order reversed every other "
        "round); busybox httpd backends in replica "
        f"namespaces on the node bridge, {ports}, {stamps} in the replicas"
    )
    print_table(
        [
            "way",
            "conn/s",
            "vs direct",
            "CPU us/conn",
            "vs direct",
            "MiB/s",
            "vs direct",
            "CPU ms/100 MiB",
            "vs direct",
            "refused SYNs",
        ],
        [
            [
                way.name,
                f"{med(way.rates):.0f}",
                f"{ratio(peer.rates, way.rates):.2f}x",
                f"{med(way.conn_cpu) * 1e6:.0f}",
                f"{ratio(peer.conn_cpu, way.conn_cpu):.2f}x",
                f"{med(way.throughput) / 2**20:.0f}",
                f"{ratio(peer.throughput, way.throughput):.2f}x",
                f"{med(way.byte_cpu) * 100 * 2**20 * 1e3:.0f}",
                f"{ratio(peer.byte_cpu, way.byte_cpu):.2f}x",
                str(way.refused),
            ]
            for way in ways
        ],
    )
    named = {way.name: way for way in ways}
    direct = named["direct to the backend (peer)"]
    steps = [
        ("conntrack", named.get("direct, untracked (notrack)"), direct),
        ("kernel DNAT, 127.0.0.1", direct, named["hand-written DNAT, 127.0.0.1"]),
        (
            "our rule set, 127.0.0.1",
            named["hand-written DNAT, 127.0.0.1"],
            named["published port, 127.0.0.1"],
        ),
        ("kernel DNAT, node address", direct, named["hand-written DNAT, node bridge address"]),
        (
            "our rule set, node address",
            named["hand-written DNAT, node bridge address"],
            named["published port, node bridge address"],
        ),
    ]
    print(
        "\nwhere the difference is: each step's second way over its first (conntrack: "
        "untracked -> direct; kernel DNAT: direct -> hand-written; our rule set: "
        "hand-written -> published)"
    )
    print_table(
        ["step", "conn/s", "CPU/conn", "MiB/s", "CPU/MiB"],
        [
            [
                label,
                f"{ratio(a.rates, b.rates):.2f}x",
                f"{ratio(a.conn_cpu, b.conn_cpu):.2f}x",
                f"{ratio(a.throughput, b.throughput):.2f}x",
                f"{ratio(a.byte_cpu, b.byte_cpu):.2f}x",
            ]
            for label, a, b in steps
            if a is not None
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="wrk connections (busybox httpd's listen backlog is 9)",
    )
    parser.add_argument(
        "--one-backend-port",
        action="store_true",
        help="all ways to one backend port (no untracked way): shows what sharing costs",
    )
    parser.add_argument(
        "--timestamps",
        action="store_true",
        help="keep TCP timestamps on in the replicas: shows what PAWS rejects cost",
    )
    args = parser.parse_args()
    missing = [tool for tool in ("wrk", "busybox", "ip", "nft") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        sys.exit(
            "this benchmark needs root and "
            + (", ".join(missing) or "nothing else")
            + " (apt-get install wrk busybox-static iproute2 nftables)"
        )
    method = Method(
        rounds=args.rounds,
        duration=args.duration,
        connections=args.connections,
        own_ports=not args.one_backend_port,
        timestamps=args.timestamps,
    )
    subnet = free_subnets(1)[0]
    bridge = f"zlb{os.getpid() % 100000}"
    with (
        tempfile.TemporaryDirectory(prefix="zlbench-l4-www-") as work,
        running_overlayd(bridge, str(subnet)) as bus,
    ):
        ways = measure(bus, Path(work), bridge, method)
    report(ways, method)


if __name__ == "__main__":
    main()
