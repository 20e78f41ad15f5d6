"""A node cut off from the network (its cable pulled) on a four-node cluster: its lease
lapses and the others run its replica, while the cut-off node, unable to reach etcd for
longer than its lease, stops its own; plugged back, it rejoins without a second copy of
anything. The nodes are joined only through a router; the node cut off (n4) is behind
NAT, so plugged back it comes in again through its NAT and the mesh."""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
from pyroute2 import IPRoute

from tests.cluster.harness import (
    NETNS_DIR,
    SPREAD_WEB,
    Cluster,
    Node,
    healthy_replicas,
    listed_nodes,
    remove_deployment,
    wait_healthy,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 60.0
FENCE_DEADLINE = 20.0  # generous: the lease is 5 s, stopping a replica a second or two
REJOIN_DEADLINE = 60.0


@pytest.fixture(scope="module")
def cluster(failover_cluster: Cluster) -> Cluster:
    """Four nodes joined only through a router, n4 behind NAT (an etcd client of the
    voters n1 to n3): n4 is the node cut off, so the others keep etcd's quorum."""
    return failover_cluster


def cable(node: Node, plugged: bool) -> None:
    """Pull (or plug back) the node's cable: the far end of its veth (on the router, or
    on its NAT) down (up)."""
    far = NETNS_DIR / node._uplink()
    with IPRoute(netns=far.name) as ip:
        index = ip.link_lookup(ifname=node.host_veth)[0]
        ip.link("set", index=index, state="up" if plugged else "down")


def running_here(node: Node, name: str) -> set[str]:
    """The containers of deployment ``name`` on the node's runtime, by id."""
    return {cid for cid in node.containers() if cid.startswith(f"{name}-")}


def test_a_cut_off_node_stops_its_replicas_and_rejoins_without_duplicates(
    cluster: Cluster,
) -> None:
    n1, n2, n3, cut = cluster
    name = n1.deployment_name("partition")
    spec = n1.spec(name, SPREAD_WEB.format(name=name, replicas=4))
    plugged = True
    try:
        n1.run("up", "-d", str(spec), "--timeout", "120", check=True)
        before = wait_healthy(cluster.nodes, name, 4, time.monotonic() + SETTLE)
        assert sorted(len(found) for found in before.values()) == [1, 1, 1, 1], before
        assert running_here(cut, name), f"{cut.name} runs no replica"

        began = time.monotonic()
        cable(cut, plugged=False)
        plugged = False
        # Cut off, the node stops its replica once its lease must have lapsed ...
        while running_here(cut, name):
            assert time.monotonic() - began < FENCE_DEADLINE, running_here(cut, name)
            time.sleep(0.2)
        fenced = time.monotonic() - began
        # ... and the other three run all four.
        after = wait_healthy([n1, n2, n3], name, 4, began + FENCE_DEADLINE + 10)
        moved = time.monotonic() - began
        print(
            f"partition: {cut.name} stopped its replica {fenced:.1f} s after its cable was "
            f"pulled; the other three ran all four {moved:.1f} s after"
        )
        assert {r["instance"] for found in after.values() for r in found} == {1, 2, 3, 4}
        assert cut.name not in listed_nodes(n1)

        cable(cut, plugged=True)
        plugged = True
        deadline = time.monotonic() + REJOIN_DEADLINE
        while listed_nodes(n1).get(cut.name) != "ready":
            assert time.monotonic() < deadline, f"{cut.name} did not rejoin"
            time.sleep(0.5)
        # Back: a few placement passes (every 2 s), and never two copies of one replica.
        until, looked = time.monotonic() + 6, 0
        while time.monotonic() < until or looked < 3:
            rows = {node.name: healthy_replicas(node, name) for node in cluster}
            count = Counter(r["instance"] for found in rows.values() for r in found)
            assert all(n == 1 for n in count.values()), rows
            assert running_here(cut, name) == set(), rows  # nothing started, nothing kept
            looked += 1
            time.sleep(0.5)
        final = wait_healthy(cluster.nodes, name, 4, time.monotonic() + 10)
        assert sorted(r["instance"] for f in final.values() for r in f) == [1, 2, 3, 4], final
        assert final[cut.name] == [], f"{cut.name} runs {final[cut.name]} again"
    finally:
        if not plugged:
            cable(cut, plugged=True)
            deadline = time.monotonic() + REJOIN_DEADLINE
            while listed_nodes(n1).get(cut.name) != "ready" and time.monotonic() < deadline:
                time.sleep(0.5)
        remove_deployment(n1, name)
