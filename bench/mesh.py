"""The mesh's cost: a replica-to-replica transfer across two nodes, three ways, one run.

- mesh: two nodes of the test harness (``tests.cluster.harness``, network
  namespaces on one bridge) made one cluster, the mesh on (the default): the
  replica on n2 sends to the replica on n1 through overlayd's WireGuard
  interfaces (``wireguard-go`` here, no kernel module);
- plain: the same cluster with ``[cluster] mesh = false``: the same transfer
  over the plain route via the other node's address, in the clear;
- raw: ``wireguard-go`` between two bare network namespaces on a veth pair,
  configured with ``wg`` (no ZLayer): what the userspace tunnel costs alone.
  Its UDP sockets get the buffers overlayd gives the mesh's
  (``shared.mesh.userspace.widen_buffers``; ``--raw-default-buffers`` leaves
  the kernel's default, which drops a burst and retransmits), so the ratio is
  the cost of the path, not of the buffers.

Each figure comes from the same two programs run with the host's Python in
the two network namespaces (the replicas' own, for mesh and plain): one
sends ``--megabytes`` MiB over one TCP connection as fast as it can
(throughput, MiB/s, the median of ``--runs``), and a ping-pong of 64-byte
messages on one connection (latency: median and 99th percentile of
``--pings`` round trips, in microseconds). The raw tunnel stays up for the
whole run and takes turns with each cluster's transfer (``--rounds``), so
each is read beside the raw figure measured under the same load. Ratios are
mesh / plain and mesh / raw. Needs root, wireguard-go and wireguard-tools
(wg); takes about 4 minutes (two cluster starts). Run:
``sudo .venv/bin/python bench/mesh.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PORT = 9107

# Serves each connection: "T <bytes>\n" -> that many bytes; "E\n" -> echo until closed.
SERVER = r"""
import socket, sys, threading
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
chunk = b"x" * (256 * 1024)
def serve(conn):
    with conn:
        reader = conn.makefile("rb")
        line = reader.readline().split()
        if line[0] == b"T":
            left = int(line[1])
            while left > 0:
                conn.sendall(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
        else:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = reader.read(64)
                if not data:
                    return
                conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# argv: address port megabytes runs pings; prints {"mibps": [...], "rtt_us": [...]}
CLIENT = r"""
import json, socket, sys, time
address = sys.argv[1]
port, megabytes, runs, pings = (int(word) for word in sys.argv[2:6])
mibps = []
for _ in range(runs):
    conn = socket.create_connection((address, port), timeout=60)
    began = time.perf_counter()
    conn.sendall(b"T %d\n" % (megabytes << 20))
    got = 0
    buffer = bytearray(1 << 20)
    while got < megabytes << 20:
        n = conn.recv_into(buffer)
        if not n:
            raise SystemExit("the transfer ended early")
        got += n
    mibps.append(megabytes / (time.perf_counter() - began))
    conn.close()
conn = socket.create_connection((address, port), timeout=60)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
conn.sendall(b"E\n")
message = b"p" * 64
rtts = []
for i in range(pings + 100):
    began = time.perf_counter()
    conn.sendall(message)
    got = 0
    while got < 64:
        got += len(conn.recv(64 - got))
    if i >= 100:
        rtts.append((time.perf_counter() - began) * 1e6)
conn.close()
print(json.dumps({"mibps": mibps, "rtt_us": rtts}))
"""


@dataclass
class Figures:
    mibps: float  # median throughput
    rtt_median: float  # microseconds
    rtt_p99: float


def in_netns(path: str) -> list[str]:
    return ["nsenter", f"--net={path}", "--"]


def measure(server_ns: str, client_ns: str, address: str, args: argparse.Namespace) -> Figures:
    """The two programs: the server in ``server_ns``, the client in ``client_ns``."""
    server = subprocess.Popen(
        [*in_netns(server_ns), sys.executable, "-c", SERVER, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        sizes = [str(args.megabytes), str(args.runs), str(args.pings)]
        done = subprocess.run(
            [*in_netns(client_ns), sys.executable, "-c", CLIENT, address, str(PORT), *sizes],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"the transfer to {address} failed: {done.stderr.strip()}")
        found = json.loads(done.stdout)
    finally:
        server.kill()
        server.wait(timeout=10)
    rtts = sorted(found["rtt_us"])
    return Figures(
        statistics.median(found["mibps"]),
        statistics.median(rtts),
        rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
    )


def median_of(found: list[Figures]) -> Figures:
    return Figures(
        statistics.median(f.mibps for f in found),
        statistics.median(f.rtt_median for f in found),
        statistics.median(f.rtt_p99 for f in found),
    )


def across_replicas(
    mesh: bool, args: argparse.Namespace, raw: tuple[str, str, str]
) -> tuple[Figures, Figures]:
    """Two harness nodes, one replica each; n2's replica sends to n1's, taking turns
    with the raw tunnel (``raw``), so both are measured under the same load: the
    medians of ``--rounds`` turns, (cluster, raw)."""
    from daemons.overlayd import plumbing
    from tests.cluster.harness import SPREAD_WEB, Cluster, form, wait_healthy

    with Cluster(2, etcd=False, mesh=mesh) as cluster:
        form(cluster)
        n1, n2 = cluster
        name = n1.deployment_name("meshbench" if mesh else "plainbench")
        spec = n1.spec(name, SPREAD_WEB.format(name=name, replicas=2))
        n1.run("up", "-d", str(spec), "--timeout", "150", check=True)
        rows = wait_healthy([n1, n2], name, 2, time.monotonic() + 90)
        one, two = rows["n1"][0], rows["n2"][0]
        if mesh:  # the record's key reached the other node: the route is the mesh's
            deadline = time.monotonic() + 30
            while not all(
                r["wireguard_key"]
                for r in json.loads(n1.run("node", "ls", "--format", "json").stdout)["nodes"]
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the mesh did not come up on both nodes within 30 s")
                time.sleep(0.5)
            time.sleep(3)  # one traffic view later
        server = str(plumbing.names_for(n1.bridge, one["id"]).netns_path)
        client = str(plumbing.names_for(n2.bridge, two["id"]).netns_path)
        ours: list[Figures] = []
        theirs: list[Figures] = []
        for _ in range(args.rounds):
            ours.append(measure(server, client, one["address"], args))
            theirs.append(measure(*raw, args))
        return median_of(ours), median_of(theirs)


@contextlib.contextmanager
def raw_wireguard(wide: bool = True) -> Iterator[tuple[str, str, str]]:
    """Two bare namespaces on a veth pair, wireguard-go on each, peers of each other:
    (server namespace path, client namespace path, the server's tunnel address)."""
    tag = f"zlbm{os.getpid() % 100000}"
    names = [f"{tag}a", f"{tag}b"]
    keys_dir = Path(tempfile.mkdtemp(prefix=tag))
    processes: list[subprocess.Popen[bytes]] = []

    def run(*command: str, namespace: str | None = None, stdin: str | None = None) -> str:
        argv = [*in_netns(f"/run/netns/{namespace}"), *command] if namespace else list(command)
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)}: {done.stderr.strip()}")
        return done.stdout.strip()

    try:
        for name in names:
            run("ip", "netns", "add", name)
            run("ip", "link", "set", "lo", "up", namespace=name)
        run("ip", "link", "add", "veth0", "netns", names[0], "type", "veth", "peer", "veth0")
        run("ip", "link", "set", "veth0", "netns", names[1])
        keys = [run("wg", "genkey") for _ in names]
        publics = [run("wg", "pubkey", stdin=key) for key in keys]
        for i, name in enumerate(names):
            other = 1 - i
            run("ip", "addr", "add", f"192.168.231.{i + 1}/30", "dev", "veth0", namespace=name)
            run("ip", "link", "set", "veth0", "up", namespace=name)
            processes.append(
                subprocess.Popen(
                    [*in_netns(f"/run/netns/{name}"), "wireguard-go", name],
                    env=dict(os.environ, WG_PROCESS_FOREGROUND="1"),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            socket_path = Path(f"/var/run/wireguard/{name}.sock")
            deadline = time.monotonic() + 10
            while not socket_path.exists():
                if time.monotonic() > deadline:
                    raise SystemExit("wireguard-go did not start within 10 s")
                time.sleep(0.05)
            key_file = keys_dir / f"{name}.key"
            key_file.write_text(keys[i] + "\n")
            run(
                "wg", "set", name, "listen-port", "51820", "private-key", str(key_file),
                "peer", publics[other], "allowed-ips", f"10.99.0.{other + 1}/32",
                "endpoint", f"192.168.231.{other + 1}:51820",
                namespace=name,
            )  # fmt: skip
            run("ip", "addr", "add", f"10.99.0.{i + 1}/24", "dev", name, namespace=name)
            run("ip", "link", "set", name, "mtu", "1420", "up", namespace=name)
        if wide:  # after the link is up: wireguard-go opens its sockets anew then
            from shared.mesh.userspace import widen_buffers

            for process in processes:  # nsenter executes wireguard-go: the same PID
                deadline = time.monotonic() + 5
                while widen_buffers(process.pid)[0] < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)  # its IPv4 and IPv6 sockets come once the link is up
        yield f"/run/netns/{names[0]}", f"/run/netns/{names[1]}", "10.99.0.1"
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)
        shutil.rmtree(keys_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=64, help="MiB a transfer sends")
    parser.add_argument("--runs", type=int, default=3, help="transfers; the median is shown")
    parser.add_argument("--pings", type=int, default=2000, help="64-byte round trips")
    parser.add_argument("--rounds", type=int, default=2, help="turns with the raw tunnel")
    parser.add_argument(
        "--raw-default-buffers",
        action="store_true",
        help="leave the raw tunnel's UDP buffers at the kernel's default",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/mesh.py needs root: its nodes are network namespaces")
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is not installed; apt-get install wireguard-go wireguard-tools"
            )
    with raw_wireguard(wide=not args.raw_default_buffers) as raw_ends:
        plain, raw_with_plain = across_replicas(False, args, raw_ends)
        mesh, raw = across_replicas(True, args, raw_ends)
    print(
        f"replica to replica across nodes, {args.megabytes} MiB x {args.runs}, "
        f"{args.pings} round trips of 64 bytes, {args.rounds} rounds"
    )
    print(f"{'':34}{'MiB/s':>10}{'rtt p50 us':>12}{'rtt p99 us':>12}")
    rows = [
        ("mesh (overlayd, wg-go)", mesh),
        ("raw wireguard-go, beside the mesh", raw),
        ("plain route (mesh off)", plain),
        ("raw wireguard-go, beside plain", raw_with_plain),
    ]
    for label, found in rows:
        print(f"{label:34}{found.mibps:>10.1f}{found.rtt_median:>12.0f}{found.rtt_p99:>12.0f}")
    for label, peer in (("plain", plain), ("raw wireguard-go", raw)):
        print(
            f"mesh / {label}: throughput {mesh.mibps / peer.mibps:.2f}x, "
            f"median latency {mesh.rtt_median / peer.rtt_median:.2f}x, "
            f"p99 latency {mesh.rtt_p99 / peer.rtt_p99:.2f}x"
        )


if __name__ == "__main__":
    main()
