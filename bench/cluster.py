"""A cluster's figures, each beside a peer measured in the same run.

placement: the leading schedd's placement (``daemons.schedd.placement.place``)
of 10,000 replicas over 1,000 simulated nodes (records in memory, no etcd, no
daemons), the goal being under 1 s. The input is made from a fixed seed:
nodes of 8, 16 or 32 CPUs and 32, 64 or 128 GiB in three zones, a quarter of
them labelled ``disk=ssd``; services of 1 to 50 replicas until there are
10,000, reserving 0 to 1 CPU and 0 to 1 GiB each, most shared, some
dedicated (one replica a node) or exclusive (alone on a node), some with
required or preferred labels, most spread, some packed or pinned to a zone.
Timed, taking turns:

- place onto empty nodes: every replica placed from nothing (the figure under test);
- place again on its own output: the steady state, where nothing moves;
- place after a node is lost: the plan in force, one node fewer;
- the same rules ranking every node for each service: what the walks over
  the nodes ordered by load save;
- peer: a naive first fit over the same input: each replica to the first node,
  in id order, with room and the required labels (no spreading, no node
  modes, no preferences, nothing kept), the least a placement can do.

With ``--live`` (as root: the nodes are network namespaces), also a real
three-node cluster of the test harness (``tests.cluster.harness``), one
machine, every node's six daemons and etcd member on its two cores:

- join: the seconds ``zlayerctl node init`` and each ``node join`` take, and
  a killed node's boot until the others list it again (its rejoin);
- failover: three replicas spread over the nodes, the node running one of
  them (the leader when it runs one: the harder case) killed outright, the
  seconds until as many healthy replicas run on the survivors; the goal is
  10 s or less. The peer is Nomad's default heartbeat grace, 10 s, before a
  client that stopped answering is marked down: stated from its
  documentation, not measured here;
- crossing: one replica, pinned to node 2, and HTTP GETs of it from the host
  through node 1's proxyd (the request crosses to node 2 over the nodes'
  LAN) beside the same GETs through node 2's proxyd (served on its own node),
  in turns of 200: the median and p99 latency of one client sending one
  request after another on a kept-alive connection, and the requests a
  second of four such clients at once, each with the crossing one's ratio
  to the same-node one.

Only the placement rows need nothing running. Run:
``.venv/bin/python bench/cluster.py`` (``--runs N``, ``--nodes N``,
``--replicas N``, ``--seed N``; ``--live``, ``--failovers N``, ``--requests N``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _cluster import percentile, timed_calls

from daemons.schedd.placement import Demand, Group, NodeMode, Pin, Plan, _place, place
from shared.wire.cluster import NodeCapacity, NodeRecord, Placement

GIB = 1 << 30
MIB = 1 << 20
MODES: tuple[NodeMode, ...] = ("shared", "dedicated", "exclusive")


def simulated_nodes(count: int, rng: random.Random) -> list[NodeRecord]:
    nodes = []
    for index in range(count):
        labels = {"zone": f"zone-{index % 3}"}
        if rng.random() < 0.25:
            labels["disk"] = "ssd"
        nodes.append(
            NodeRecord(
                id=f"node-{index:05d}",
                name=f"host-{index}",
                address=f"10.0.{index // 250}.{index % 250 + 1}",
                peer_port=7443,
                labels=labels,
                capacity=NodeCapacity(
                    cpu=rng.choice([8.0, 16.0, 32.0]), memory=rng.choice([32, 64, 128]) * GIB
                ),
            )
        )
    return nodes


def simulated_wants(replicas: int, rng: random.Random) -> list[Demand]:
    wants: list[Demand] = []
    total = 0
    while total < replicas:
        index = len(wants)
        mode = rng.choices(MODES, [90, 7, 3])[0]
        count = min(rng.choice([1, 2, 3, 5, 10, 20, 50]), replicas - total)
        if mode == "exclusive":
            count = min(count, 3)
        labels = {"zone": f"zone-{rng.randrange(3)}"} if rng.random() < 0.1 else {}
        affinity: str | Pin = rng.choices(["spread", "pack", "pin"], [80, 15, 5])[0]
        if affinity == "pin":
            affinity = Pin("zone", labels.get("zone", f"zone-{rng.randrange(3)}"))
        group = Group(
            count=count,
            cpu=rng.choice([0.0, 0.25, 0.5, 1.0]),
            memory=rng.choice([0, 128 * MIB, 512 * MIB, GIB]),
            affinity=affinity,  # type: ignore[arg-type]
        )
        wants.append(
            Demand(
                deployment=f"app{index % 40}",
                service=f"svc{index}",
                revision=1,
                groups=(group,),
                node_mode=mode,
                labels=labels,
                prefer_labels={"disk": "ssd"} if rng.random() < 0.1 else {},
            )
        )
        total += count
    return wants


def first_fit(nodes: Sequence[NodeRecord], wants: Sequence[Demand]) -> dict[str, list[Placement]]:
    """The peer: each replica to the first node in id order with room and the labels."""
    order = sorted(nodes, key=lambda record: record.id)
    cpu_free = [record.capacity.cpu for record in order]
    memory_free = [record.capacity.memory for record in order]
    result: dict[str, list[Placement]] = {record.id: [] for record in order}
    for want in wants:
        for name, group in want.replica_names():
            for index, record in enumerate(order):
                if (
                    cpu_free[index] >= group.cpu
                    and memory_free[index] >= group.memory
                    and all(record.labels.get(k) == v for k, v in want.labels.items())
                ):
                    cpu_free[index] -= group.cpu
                    memory_free[index] -= group.memory
                    result[record.id].append(
                        Placement(
                            deployment=want.deployment,
                            service=want.service,
                            replica=name,
                            revision=want.revision,
                            cpu=group.cpu,
                            memory=group.memory,
                        )
                    )
                    break
    return result


def where(nodes: dict[str, list[Placement]]) -> dict[str, str]:
    return {p.replica: node_id for node_id, placed in nodes.items() for p in placed}


def most_on_one_node(nodes: dict[str, list[Placement]], services: set[str]) -> int:
    """The most replicas of one of ``services`` that any node holds."""
    return max(
        (
            count
            for placed in nodes.values()
            for count in Counter(p.service for p in placed if p.service in services).values()
        ),
        default=0,
    )


def placement(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    nodes = simulated_nodes(args.nodes, rng)
    wants = simulated_wants(args.replicas, rng)
    fresh = place(nodes, wants, {})
    lost_id = max(fresh.nodes, key=lambda node_id: len(fresh.nodes[node_id]))
    fewer = [record for record in nodes if record.id != lost_id]
    after_loss = place(fewer, wants, fresh.nodes)
    peer_nodes = first_fit(nodes, wants)

    ways: dict[str, Callable[[], object]] = {
        "place onto empty nodes": lambda: place(nodes, wants, {}),
        "place again on its own output": lambda: place(nodes, wants, fresh.nodes),
        "place after a node is lost": lambda: place(fewer, wants, fresh.nodes),
        "same rules, every node ranked": lambda: _place(nodes, wants, {}, walks=False),
        "naive first fit (peer)": lambda: first_fit(nodes, wants),
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.runs):  # taking turns, so background load lands on all alike
        for name, work in ways.items():
            samples[name] += timed_calls(work, 1)

    again: Plan = place(nodes, wants, fresh.nodes)
    # Services that asked to be spread, and could be: fewer replicas than nodes.
    spread = {
        w.service for w in wants if all(g.affinity == "spread" for g in w.groups) and not w.labels
    }
    dedicated = {w.service for w in wants if w.node_mode == "dedicated"}
    before, after = where(fresh.nodes), where(after_loss.nodes)
    moved = sum(1 for name, node_id in before.items() if after.get(name) != node_id)
    print(
        f"{len(nodes)} simulated nodes, {len(wants)} services, "
        f"{sum(g.count for w in wants for g in w.groups)} replicas; {args.runs} runs each"
    )
    peer = statistics.median(samples["naive first fit (peer)"])
    print(f"{'what':<32} {'median ms':>10} {'p90 ms':>8} {'vs peer':>8}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:<32} {median:>10.1f} {percentile(values, 90):>8.1f} {median / peer:>7.2f}x")
    print(
        f"placed {fresh.placed()}, pending {len(fresh.pending)} "
        f"(peer placed {sum(len(v) for v in peer_nodes.values())}); "
        f"most replicas of one spread service on one node: {most_on_one_node(fresh.nodes, spread)} "
        f"(peer {most_on_one_node(peer_nodes, spread)}); "
        f"of one dedicated service: {most_on_one_node(fresh.nodes, dedicated)} "
        f"(peer {most_on_one_node(peer_nodes, dedicated)}); "
        f"placing again moved {sum(1 for n, i in where(again.nodes).items() if before[n] != i)}; "
        f"losing {lost_id} ({len(fresh.nodes[lost_id])} replicas) moved {moved}"
    )


# One replica pinned to a node; it answers with its hostname.
PINNED_WEB = """
version: v1
deployment: {name}
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8090 -h /www
    endpoints: [{{name: http, protocol: http, port: 8090, expose: public}}]
    scale: {{mode: fixed, replicas: 1}}
    affinity: {{pin: "id={node}"}}
    stop_grace_period: 1s
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""
TURN = 200  # requests of one way before the other's turn
CLIENTS = 4  # clients at once for the requests a second
THROUGHPUT_SECONDS = 3.0  # of each way, in turns of a second


def _latencies(host: str, port: int, count: int) -> list[float]:
    """Milliseconds of each of ``count`` GETs, one after another on one connection."""
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=10)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("GET", "/index.html")
            reply = connection.getresponse()
            reply.read()
            samples.append((time.perf_counter() - started) * 1000)
            if reply.status != 200:
                raise RuntimeError(f"{host}:{port} answered {reply.status}")
    finally:
        connection.close()
    return samples


def _throughput(host: str, port: int, seconds: float) -> int:
    """Requests CLIENTS clients at once, each one request after another, complete in
    ``seconds``."""
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.perf_counter() + seconds

    def client() -> int:
        import http.client

        done = 0
        connection = http.client.HTTPConnection(host, port, timeout=10)
        try:
            while time.perf_counter() < deadline:
                connection.request("GET", "/index.html")
                connection.getresponse().read()
                done += 1
        finally:
            connection.close()
        return done

    with ThreadPoolExecutor(CLIENTS) as pool:
        return sum(pool.map(lambda _: client(), range(CLIENTS)))


def crossing(cluster: Any, requests: int) -> None:
    """A request crossing nodes beside one served on the same node, in one run."""
    from tests.cluster.harness import wait_healthy

    n1, n2 = cluster[0], cluster[1]
    ids = {r["name"]: r["id"] for r in _node_list(n1)}
    name = n1.deployment_name("crossing")
    spec = n1.spec(name, PINNED_WEB.format(name=name, node=ids[n2.name]))
    ways = {"crossing (n1's proxyd, replica on n2)": n1, "same node (n2's proxyd)": n2}
    latency: dict[str, list[float]] = {way: [] for way in ways}
    served: dict[str, int] = dict.fromkeys(ways, 0)
    try:
        n1.run("up", "-d", str(spec), "--timeout", "120", check=True)
        found = wait_healthy(list(cluster), name, 1, time.monotonic() + 60)
        assert [n for n, rows in found.items() if rows] == [n2.name], found
        for node in ways.values():  # each path warm: pooled, routed, resolved
            _latencies(str(node.lan.ip), 8090, 50)
        while min(len(v) for v in latency.values()) < requests:
            for way, node in ways.items():
                latency[way] += _latencies(str(node.lan.ip), 8090, TURN)
        for _ in range(int(THROUGHPUT_SECONDS)):
            for way, node in ways.items():
                served[way] += _throughput(str(node.lan.ip), 8090, 1.0)
    finally:
        n1.run("down", name, timeout=120)
    same = "same node (n2's proxyd)"
    print(
        f"{'request through proxyd':<40} {'median ms':>10} {'p99 ms':>8} {'req/s':>8} "
        f"{'vs same node':>14}"
    )
    for way in ways:
        median = statistics.median(latency[way])
        rate = served[way] / THROUGHPUT_SECONDS
        ratio = median / statistics.median(latency[same])
        print(
            f"{way:<40} {median:>10.2f} {percentile(latency[way], 99):>8.2f} {rate:>8.0f} "
            f"{f'{ratio:.2f}x median':>14}"
        )
    cross = next(way for way in ways if way != same)
    median_ratio = statistics.median(latency[cross]) / statistics.median(latency[same])
    p99_ratio = percentile(latency[cross], 99) / percentile(latency[same], 99)
    print(
        f"crossing / same node: median {median_ratio:.2f}x, p99 {p99_ratio:.2f}x, "
        f"requests a second {served[cross] / max(served[same], 1):.2f}x "
        f"({len(latency[cross])} requests each way, one client; {CLIENTS} clients for "
        f"{THROUGHPUT_SECONDS:.0f} s each way)"
    )


def _node_list(node: Any) -> list[dict[str, Any]]:
    import json

    out = node.run("node", "ls", "--format", "json", check=True)
    nodes: list[dict[str, Any]] = json.loads(out.stdout)["nodes"]
    return nodes


NOMAD_HEARTBEAT_GRACE = 10.0  # seconds: Nomad's default heartbeat_grace, from its docs
FAILOVER_GOAL = 10.0
FAILOVER_DEADLINE = 60.0


def live(args: argparse.Namespace) -> None:
    """Join and failover times on a real three-node cluster of the test harness."""
    if not args.live:
        return
    if os.geteuid() != 0:
        print("live: skipped, a cluster of network namespaces needs root")
        return
    from tests.cluster.harness import (
        SPREAD_WEB,
        Cluster,
        form,
        listed_nodes,
        wait_healthy,
    )

    joins: list[float] = []
    rejoins: list[float] = []
    failovers: list[float] = []
    with Cluster(3, etcd=False) as cluster:
        took = form(cluster)
        init = took.pop(cluster[0].name)
        joins += took.values()
        crossing(cluster, args.requests)
        first = cluster[0]
        name = first.deployment_name("failover")
        spec = first.spec(name, SPREAD_WEB.format(name=name, replicas=3))
        try:
            first.run("up", "-d", str(spec), "--timeout", "120", check=True)
            for _ in range(args.failovers):
                before = wait_healthy(cluster.nodes, name, 3, time.monotonic() + 60)
                leader = listed_nodes(first)["leader"]
                running = [n for n in cluster if before[n.name]]
                killed = next((n for n in running if n.name == leader), running[0])
                survivors = [n for n in cluster if n is not killed]
                began = time.monotonic()
                killed.kill()
                wait_healthy(survivors, name, 3, began + FAILOVER_DEADLINE)
                failovers.append(time.monotonic() - began)
                print(
                    f"failover {len(failovers)}: {killed.name}"
                    f"{' (leader)' if killed.name == leader else ''} killed with "
                    f"{len(before[killed.name])} replica(s), healthy elsewhere in "
                    f"{failovers[-1]:.1f} s"
                )
                began = time.monotonic()
                killed.restart()
                while killed.name not in listed_nodes(survivors[0]):
                    assert time.monotonic() < began + 60, f"{killed.name} did not rejoin"
                    time.sleep(0.1)
                rejoins.append(time.monotonic() - began)
                # The next kill's node must find the others' placements settled.
                first = survivors[0]
        finally:
            first.run("down", name, timeout=120)
    print(f"{'what':<40} {'median s':>9} {'max s':>7} {'goal / peer':>12}")
    print(f"{'node init':<40} {init:>9.1f} {init:>7.1f} {'':>12}")
    print(f"{'node join':<40} {statistics.median(joins):>9.1f} {max(joins):>7.1f} {'':>12}")
    print(
        f"{'killed node booted until listed again':<40} {statistics.median(rejoins):>9.1f} "
        f"{max(rejoins):>7.1f} {'':>12}"
    )
    print(
        f"{'failover: kill to healthy elsewhere':<40} {statistics.median(failovers):>9.1f} "
        f"{max(failovers):>7.1f} {'<= ' + f'{FAILOVER_GOAL:.0f}':>12}"
    )
    print(
        f"{'peer: Nomad heartbeat grace (stated)':<40} {NOMAD_HEARTBEAT_GRACE:>9.1f} "
        f"{'-':>7} {'not measured':>12}"
    )
    print(f"{len(failovers)} failovers; the cluster took {cluster.up_seconds:.1f} s to boot")


PARTS: dict[str, Callable[[argparse.Namespace], None]] = {"placement": placement, "live": live}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", help=f"which figures: {', '.join(PARTS)} (all)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each way")
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes")
    parser.add_argument("--replicas", type=int, default=10000, help="replicas to place")
    parser.add_argument("--seed", type=int, default=13, help="seed of the simulated input")
    parser.add_argument(
        "--live", action="store_true", help="also join and failover on a real 3-node cluster"
    )
    parser.add_argument("--failovers", type=int, default=3, help="nodes killed with --live")
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests each way, crossing and not (--live)"
    )
    args = parser.parse_args()
    for name in args.parts:
        if name not in PARTS:
            parser.error(f"there is no part {name!r}; the parts are {', '.join(PARTS)}")
    for name in args.parts or PARTS:
        PARTS[name](args)


if __name__ == "__main__":
    main()
