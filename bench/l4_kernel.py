"""The kernel L4 path: a published tcp port against connecting to the backend directly.

Starts the six daemons with ``zlayerctl daemon run --detach`` under a fresh
temporary prefix (overlayd on a bridge and free /24 of its own), attaches
two replica namespaces through overlayd's ``Attach``, runs Debian's busybox
``httpd`` in each (port 8080, a 64-byte page and a 1 MiB file), and pushes
one deployment with ``SetTraffic``: a public tcp endpoint on one node port
with one backend, and another with both. Then ``wrk`` (2 threads, 32
connections, ``--duration`` seconds, default 5) measures, each way taking
turns ``--rounds`` times (default 3, median reported):

- **connection rate**: requests/s for the 64-byte page. busybox httpd
  answers one request per connection and closes it, so each request is a
  new TCP connection: through the published port, each is a new conntrack
  entry and one pass through the DNAT rule;
- **throughput**: transfer/s of the 1 MiB file (connections kept).

Ways: the backend's own address (the peer, no NAT: ``direct``); the
published port on 127.0.0.1 (the node's own connections: nat output,
route_localnet and masquerade); the published port on the node's bridge
address; and the port whose map round-robins over both replicas. Ratios are
each way's median over the direct one's. wrk and the servers share the
machine's cores, so the absolute figures say as much about the machine as
about the path; read the ratios.

Clean-up, also on an error, Ctrl-C or SIGTERM: the servers killed by their
PIDs, the deployment's traffic removed, the namespaces detached, then
``zlayer-overlayd --remove-network`` after the daemons stop.

Needs root, wrk and busybox-static. Run: ``.venv/bin/python bench/l4_kernel.py``
(about 1 minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import Cluster, print_table, running_daemons
from replica_start import free_subnets

from ctl.supervisor import find_executable
from shared.bus import DAEMONS_BY_NAME, open_bus, proxy
from shared.paths import Paths
from shared.wire.overlay import Attachment
from shared.wire.traffic import Backend, DeploymentTraffic, ServiceTraffic

BACKEND_PORT = 8080
SMALL = "small.html"
BIG = "big.bin"


def call(cluster: Cluster, method: str, *args: Any) -> Any:
    async def run() -> Any:
        bus = open_bus(cluster.bus_address)
        try:
            return await getattr(proxy(DAEMONS_BY_NAME["overlayd"], bus), method)(*args)
        finally:
            bus.close()

    return asyncio.run(run())


def wrk(url: str, duration: int) -> tuple[float, float]:
    """(requests/s, bytes/s) of one wrk run."""
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{duration}s", url],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    requests = re.search(r"Requests/sec:\s+([\d.]+)", out)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    if requests is None or transfer is None:
        raise RuntimeError(f"wrk printed no figures: {out.strip()}")
    scale = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[transfer.group(2)]
    return float(requests.group(1)), float(transfer.group(1)) * scale


def free_ports(count: int) -> list[int]:
    """Node ports nothing listens on now (the published ports)."""
    listening = subprocess.run(["ss", "-Htan"], capture_output=True, text=True).stdout
    used = {int(m) for m in re.findall(r":(\d+)\s", listening)}
    base = 24000 + os.getpid() % 1000
    return [p for p in range(base, base + 100) if p not in used][:count]


def remove_network(paths: Paths, env: dict[str, str]) -> None:
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


def measure(cluster: Cluster, work: Path, rounds: int, duration: int) -> None:
    www = work / "www"
    www.mkdir()
    (www / SMALL).write_text("x" * 63 + "\n")
    (www / BIG).write_bytes(os.urandom(2**20))
    attached: list[Attachment] = []
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("bench-l4-1", "bench-l4-2"):
            attachment = Attachment.model_validate_json(call(cluster, "attach", name, name))
            attached.append(attachment)
            servers.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        Path(attachment.netns).name,
                        "busybox",
                        "httpd",
                        "-f",
                        "-p",
                        str(BACKEND_PORT),
                        "-h",
                        str(www),
                    ]
                )
            )
        one_port, two_port = free_ports(2)
        backends = [
            Backend(replica=a.container_id, instance=i + 1, revision=1, address=a.address)
            for i, a in enumerate(attached)
        ]

        def endpoint(port: int) -> dict[str, Any]:
            return {
                "name": "http",
                "protocol": "tcp",
                "port": port,
                "target_port": BACKEND_PORT,
                "expose": "public",
            }

        traffic = DeploymentTraffic(
            deployment="bench",
            services=[
                ServiceTraffic(
                    deployment="bench",
                    service="one",
                    endpoints=[endpoint(one_port)],
                    backends=backends[:1],
                ),
                ServiceTraffic(
                    deployment="bench",
                    service="two",
                    endpoints=[endpoint(two_port)],
                    backends=backends,
                ),
            ],
        )
        call(cluster, "set_traffic", "bench", traffic.model_dump_json())
        gateway = attached[0].gateway
        ways = {
            "direct to the backend (peer)": f"http://{backends[0].address}:{BACKEND_PORT}",
            "published port, 127.0.0.1": f"http://127.0.0.1:{one_port}",
            "published port, node bridge address": f"http://{gateway}:{one_port}",
            "published port, 2 backends, 127.0.0.1": f"http://127.0.0.1:{two_port}",
        }
        for url in ways.values():  # up and answering, and warm
            wrk(f"{url}/{SMALL}", 1)
        rates: dict[str, list[float]] = {way: [] for way in ways}
        throughput: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, url in ways.items():
                rates[way].append(wrk(f"{url}/{SMALL}", duration)[0])
            for way, url in ways.items():
                throughput[way].append(wrk(f"{url}/{BIG}", duration)[1])
        removal = DeploymentTraffic(deployment="bench").model_dump_json()
        call(cluster, "set_traffic", "bench", removal)
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for attachment in attached:
            with contextlib.suppress(Exception):
                call(cluster, "detach", attachment.container_id)

    peer = next(iter(ways))
    base_rate = statistics.median(rates[peer])
    base_bytes = statistics.median(throughput[peer])
    print(
        f"\nwrk -t2 -c32 -d{duration}s, {rounds} rounds (median), busybox httpd backends "
        "in replica namespaces on the node bridge"
    )
    print_table(
        ["way", "conn/s (64 B page)", "vs direct", "MiB/s (1 MiB file)", "vs direct"],
        [
            [
                way,
                f"{statistics.median(rates[way]):.0f}",
                f"{statistics.median(rates[way]) / base_rate:.2f}x",
                f"{statistics.median(throughput[way]) / 2**20:.0f}",
                f"{statistics.median(throughput[way]) / base_bytes:.2f}x",
            ]
            for way in ways
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    args = parser.parse_args()
    missing = [tool for tool in ("wrk", "busybox", "ip", "nft") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        sys.exit(
            "this benchmark needs root and "
            + (", ".join(missing) or "nothing else")
            + " (apt-get install wrk busybox-static iproute2 nftables)"
        )
    subnet = free_subnets(1)[0]
    bridge = f"zlb{os.getpid() % 100000}"
    config = {"overlayd": f'bridge = "{bridge}"\nsubnet = "{subnet}"\n'}
    with (
        tempfile.TemporaryDirectory(prefix="zlbench-l4-") as work,
        running_daemons(config, after_stop=remove_network) as cluster,
    ):
        measure(cluster, Path(work), args.rounds, args.duration)


if __name__ == "__main__":
    main()
