"""The encrypted mesh across a routed network, one node behind NAT (issue 14).

On the shared cluster (``meshed_cluster``): three nodes joined only through a
router namespace (no shared bridge), n3 behind a NAT namespace in front of it;
node init and join turn the mesh on. For the module: a spread web service with
one replica a node, whose replicas also serve a 4 MiB file. nft counters in the router's
prerouting hook count every packet that crosses it with a replica block's
address in the clear, and every UDP packet (WireGuard's) between nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cluster.harness import Cluster, Node, long_connection, remove_deployment, wait_healthy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 60.0
BIG = 4 * 1024 * 1024

# One replica a node; each serves its hostname and a 4 MiB file of random bytes
# with its MD5 beside it.
WEB = """
version: v1
deployment: {name}
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - >-
          mkdir -p /www && hostname > /www/index.html &&
          dd if=/dev/urandom of=/www/big bs=4096 count=1024 2>/dev/null &&
          md5sum /www/big | cut -d' ' -f1 > /www/big.md5 &&
          exec httpd -f -p 8080 -h /www
    endpoints: [{{name: http, protocol: http, port: 8080, expose: public}}]
    scale: {{mode: fixed, replicas: 3}}
    affinity: spread
    stop_grace_period: 1s
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""

# In the router: what crosses it, with the nodes' replica blocks filled in.
COUNTERS = """
table inet meshcapture {{
  counter plain {{ }}
  counter tunnel {{ }}
  chain seen {{
    type filter hook prerouting priority -300;
    ip saddr {{ {blocks} }} counter name plain
    ip daddr {{ {blocks} }} counter name plain
    meta l4proto udp counter name tunnel
  }}
}}
"""


@dataclass
class Meshed:
    cluster: Cluster
    name: str  # the web deployment
    replicas: dict[str, dict[str, Any]]  # node name -> its replica's ps row


def node_list(node: Node) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(
        node.run("node", "ls", "--format", "json", check=True).stdout
    )
    return found


def by_name(listed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {record["name"]: record for record in listed["nodes"]}


def counters(cluster: Cluster) -> dict[str, int]:
    """Packets each router counter saw."""
    out = cluster.in_router("nft", "-j", "list", "counters", "table", "inet", "meshcapture")
    assert out.returncode == 0, out.stderr
    found = {}
    for item in json.loads(out.stdout)["nftables"]:
        if "counter" in item:
            found[item["counter"]["name"]] = int(item["counter"]["packets"])
    return found


def in_replica(node: Node, name: str, script: str, timeout: float = 60) -> str:
    """``sh -c script`` inside ``node``'s replica of ``name``; its output."""
    done = node.run("exec", "web", "-d", name, "--", "sh", "-c", script, timeout=timeout)
    assert done.returncode == 0, (node.name, script, done.stdout, done.stderr)
    return done.stdout


def request(address: str, path: str) -> str:
    """A shell pipeline: ``GET path`` of ``address``:8080, the whole answer on stdout."""
    return f"printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {address} 8080"


def get_from_replica(node: Node, name: str, address: str, path: str) -> str:
    """The last line of ``GET path`` from ``address``:8080 (a one-line body), fetched
    inside ``node``'s replica."""
    return in_replica(node, name, f"{request(address, path)} | tail -n 1").strip()


@pytest.fixture(scope="module")
def meshed(meshed_cluster: Cluster) -> Iterator[Meshed]:
    cluster = meshed_cluster
    n1 = cluster[0]
    # From here on, nothing of a replica block may cross the router in the clear.
    loaded = subprocess.run(
        ["nsenter", f"--net=/run/netns/{cluster.router_netns}", "nft", "-f", "-"],
        input=COUNTERS.format(blocks=", ".join(str(node.subnet) for node in cluster)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    name = n1.deployment_name("mesh")
    try:
        spec = n1.spec(name, WEB.format(name=name))
        n1.run("up", "-d", str(spec), "--timeout", "150", check=True)
        rows = wait_healthy(cluster.nodes, name, 3, time.monotonic() + SETTLE)
        assert all(len(found) == 1 for found in rows.values()), rows
        yield Meshed(cluster, name, {node: found[0] for node, found in rows.items()})
    finally:
        remove_deployment(n1, name)
        cluster.in_router("nft", "delete", "table", "inet", "meshcapture")


def test_a_node_behind_nat_joins_as_an_etcd_client_and_node_ls_says_why(meshed: Meshed) -> None:
    n1, _, n3 = meshed.cluster
    records = by_name(node_list(n1))
    assert records["n3"]["etcd_member"] is False
    assert records["n3"]["reachable"] is False and "behind NAT" in records["n3"]["unreachable"]
    # seen at its join (no behind_nat in its settings): the NAT's address, not its own
    outside = meshed.cluster.link_address(n3.index).ip
    assert (
        f"its join came from {outside}, not its address {n3.lan.ip}"
        in (records["n3"]["unreachable"])
    ), records["n3"]
    assert records["n1"]["etcd_member"] and records["n2"]["etcd_member"]
    assert all(records[n]["unreachable"] == "" for n in ("n1", "n2"))
    table = n1.run("node", "ls", check=True).stdout
    assert "HANDSHAKE" in table.splitlines()[0] and "TRANSFER" in table.splitlines()[0]
    assert "n3 (" in table and "behind NAT" in table, table
    assert "behind NAT" in n3.run("node", "ls", check=True).stdout


def test_replicas_reach_each_other_across_nodes_only_through_the_mesh(meshed: Meshed) -> None:
    n1, n2, n3 = meshed.cluster
    name, replicas = meshed.name, meshed.replicas
    # Each replica reaches the others, the NAT'd node's too, both ways.
    for source in (n1, n2, n3):
        for target in (n1, n2, n3):
            if source is target:
                continue
            body = get_from_replica(source, name, replicas[target.name]["address"], "/index.html")
            assert body == f"{name}-web-{replicas[target.name]['instance']}", (
                source.name,
                target.name,
                body,
            )
    # 4 MiB from n2's and n3's replicas into n1's, intact (MSS and MTU leave nothing to
    # fragment or drop).
    for target in (n2, n3):
        address = replicas[target.name]["address"]
        expected = get_from_replica(n1, name, address, "/big.md5")
        # the body is the answer's last BIG bytes: a short or damaged one has another sum
        digest = in_replica(n1, name, f"{request(address, '/big')} | tail -c {BIG} | md5sum")
        assert digest.split()[0] == expected, target.name
    seen = counters(meshed.cluster)
    assert seen["plain"] == 0, f"replica traffic crossed the router in the clear: {seen}"
    assert seen["tunnel"] > 0, seen
    # node ls shows a recent handshake and traffic with each peer.
    records = by_name(node_list(n1))
    for other in ("n2", "n3"):
        peer = records[other]["mesh_peer"]
        assert peer is not None and peer["last_handshake"] > time.time() - 180, records[other]
        assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0, peer
    table = n1.run("node", "ls", check=True).stdout
    assert "s ago" in table and "in," in table, table


def test_proxyd_on_any_node_reaches_every_nodes_replica(meshed: Meshed) -> None:
    n1, n2, _ = meshed.cluster
    name, replicas = meshed.name, meshed.replicas
    want = {f"{name}-web-{r['instance']}" for r in replicas.values()}
    for node in (n1, n2):  # n3 is behind NAT: the host does not reach it
        answered = set()
        for _ in range(30):
            with urllib.request.urlopen(f"http://{node.lan.ip}:8080/index.html", timeout=10) as r:
                answered.add(r.read().decode().strip())
        assert answered == want, (node.name, answered)


def test_rotate_key_keeps_a_long_running_connection(meshed: Meshed) -> None:
    n1, n2, _ = meshed.cluster
    ends = ((n2, meshed.replicas["n2"]), (n1, meshed.replicas["n1"]))
    with long_connection(*ends, 9099) as exchange:
        assert exchange(5) == 5
        before = by_name(node_list(n1))["n2"]["wireguard_key"]
        rotated = n2.run("node", "rotate-key", check=True)
        assert "new mesh key" in rotated.stderr, rotated.stderr
        deadline = time.monotonic() + 30
        while by_name(node_list(n1))["n2"]["wireguard_key"] == before:
            assert time.monotonic() < deadline, "n1 did not take n2's new key from its record"
            time.sleep(0.25)
        # The same connection goes on across the new key (50 more lines, 10 s).
        assert exchange(50) == 55
        peer = by_name(node_list(n1))["n2"]["mesh_peer"]
        assert peer is not None and peer["public_key"] != before
