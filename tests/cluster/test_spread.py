"""Replicas across a three-node cluster: four replicas of one service spread over the
nodes, each node runs what it was placed, and `up` from one node waits for the
replicas on all of them. On the shared cluster (``meshed_cluster``), n3 behind NAT."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest

from tests.cluster.harness import SPREAD_WEB, Cluster, Node, remove_deployment

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 30.0


@pytest.fixture(scope="module")
def cluster(meshed_cluster: Cluster) -> Cluster:
    """The shared cluster: three nodes joined only through a router (replica traffic
    through the mesh), n3 behind NAT."""
    return meshed_cluster


def all_replicas(node: Node, name: str) -> list[dict[str, Any]]:
    """`ps --containers` on ``node``: the replicas of every node, each naming its node."""
    out = node.run("ps", "--containers", "-d", name, "--format", "json", check=True)
    return [r for r in json.loads(out.stdout) if r["deployment"] == name]


def node_names(node: Node) -> dict[str, str]:
    """Each node's id to its name (its hostname: n1, n2, n3), as ``node`` lists them."""
    out = node.run("node", "ls", "--format", "json", check=True)
    return {record["id"]: record["name"] for record in json.loads(out.stdout)["nodes"]}


def local_replicas(node: Node, name: str) -> list[dict[str, Any]]:
    names = node_names(node)
    return [r for r in all_replicas(node, name) if names.get(r["node"]) == node.name]


def test_four_replicas_spread_over_three_nodes(cluster: Cluster) -> None:
    n1 = cluster[0]
    name = n1.deployment_name("spread")
    spec = n1.spec(name, SPREAD_WEB.format(name=name, replicas=4))
    try:
        # `up` on one node waits until all four run healthy, wherever they were placed.
        n1.run("up", "-d", str(spec), "--timeout", "120", check=True)
        deadline = time.monotonic() + SETTLE
        while True:
            rows = {node.name: local_replicas(node, name) for node in cluster}
            healthy = {
                n: [r for r in found if r["health"] == "healthy"] for n, found in rows.items()
            }
            if sum(len(found) for found in healthy.values()) == 4:
                break
            assert time.monotonic() < deadline, f"not four healthy replicas: {rows}"
            time.sleep(0.5)
        # Spread: every node runs one or two, each instance number once in the cluster.
        assert sorted(len(found) for found in healthy.values()) == [1, 1, 2], healthy
        instances = Counter(r["instance"] for found in healthy.values() for r in found)
        assert sorted(instances) == [1, 2, 3, 4] and set(instances.values()) == {1}
        # Each replica's address is in its own node's block.
        for node in cluster:
            for row in healthy[node.name]:
                assert row["address"].startswith(str(node.subnet.network_address)[:-1]), row
        # `ps --containers` on any one node lists all four, each with the node that runs it.
        where = {r["instance"]: n for n, found in healthy.items() for r in found}
        names = node_names(n1)
        for node in cluster:
            rows = all_replicas(node, name)
            assert {r["instance"]: names.get(r["node"]) for r in rows} == where, (node.name, rows)
            table = node.run("ps", "--containers", "-d", name, check=True).stdout
            assert "NODE" in table.splitlines()[0], table
            assert all(r["node"] in table for r in rows), table
        # The deployment's status, on any node, counts the replicas of every node.
        for node in cluster:
            out = node.run("ps", "--format", "json", check=True)
            status = next(s for s in json.loads(out.stdout) if s["name"] == name)
            web = status["services"][0]
            assert (web["running"], web["healthy"], web["desired"]) == (4, 4, 4), status
        # A request to any node's proxyd reaches the replicas of every node (each
        # answers with its hostname, <deployment>-web-<instance>), at their own addresses.
        # (the host reaches n3's only from inside it: n3 is behind NAT)
        for node in cluster:
            seen = answers_on(node, f"http://{node.lan.ip}:8080/index.html", 40)
            assert seen == {f"{name}-web-{i}" for i in range(1, 5)}, (node.name, seen)
    finally:
        remove_deployment(n1, name)


# The same GETs as :func:`answers`, run inside a node (the host's Python).
ANSWERS = """
import sys, urllib.request
found = set()
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
            found.add(reply.read().decode().strip())
    except OSError as exc:
        found.add(f"error: {exc}")
print("\\n".join(sorted(found)))
"""


def answers_on(node: Node, url: str, count: int) -> set[str]:
    """:func:`answers` from the host, or from inside ``node`` when it is behind NAT."""
    if not node.behind_nat:
        return answers(url, count)
    done = node.sh(sys.executable, "-c", ANSWERS, url, str(count), check=True)
    return set(done.stdout.splitlines())


def answers(url: str, count: int) -> set[str]:
    """The bodies of ``count`` GETs of ``url`` (a failed one counts as its error)."""
    found = set()
    for _ in range(count):
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                found.add(reply.read().decode().strip())
        except OSError as exc:
            found.add(f"error: {exc}")
    return found
