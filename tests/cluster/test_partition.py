"""A node cut off from the LAN (its cable pulled) on a three-node cluster: its lease
lapses and the others run its replica, while the cut-off node, unable to reach etcd for
longer than its lease, stops its own; plugged back, it rejoins without a second copy of
anything."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from tests.cluster.harness import (
    SPREAD_WEB,
    Cluster,
    Node,
    form,
    healthy_replicas,
    listed_nodes,
    wait_healthy,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 60.0
FENCE_DEADLINE = 20.0  # generous: the lease is 5 s, stopping a replica a second or two
REJOIN_DEADLINE = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three nodes made one cluster by node init on n1 and node join on the others."""
    with Cluster(3, etcd=False) as started:
        form(started)
        yield started
    left = started.leftovers()
    assert not left, f"the cluster left these behind: {left}"


def cable(node: Node, plugged: bool) -> None:
    """Pull (or plug back) the node's LAN cable: the host's end of its veth down (up)."""
    with IPRoute() as ip:
        index = ip.link_lookup(ifname=node.host_veth)[0]
        ip.link("set", index=index, state="up" if plugged else "down")


def running_here(node: Node, name: str) -> set[str]:
    """The containers of deployment ``name`` on the node's runtime, by id."""
    return {cid for cid in node.containers() if cid.startswith(f"{name}-")}


def test_a_cut_off_node_stops_its_replicas_and_rejoins_without_duplicates(
    cluster: Cluster,
) -> None:
    n1, n2, n3 = cluster
    name = n1.deployment_name("partition")
    spec = n1.spec(name, SPREAD_WEB.format(name=name, replicas=3))
    plugged = True
    try:
        n1.run("up", "-d", str(spec), "--timeout", "120", check=True)
        before = wait_healthy(cluster.nodes, name, 3, time.monotonic() + SETTLE)
        assert sorted(len(found) for found in before.values()) == [1, 1, 1], before
        assert running_here(n3, name), "n3 runs no replica"

        began = time.monotonic()
        cable(n3, plugged=False)
        plugged = False
        # Cut off, n3 stops its replica once its lease must have lapsed ...
        while running_here(n3, name):
            assert time.monotonic() - began < FENCE_DEADLINE, running_here(n3, name)
            time.sleep(0.2)
        fenced = time.monotonic() - began
        # ... and the other two run all three.
        after = wait_healthy([n1, n2], name, 3, began + FENCE_DEADLINE + 10)
        moved = time.monotonic() - began
        print(
            f"partition: n3 stopped its replica {fenced:.1f} s after its cable was pulled; "
            f"the other two ran all three {moved:.1f} s after"
        )
        assert {r["instance"] for found in after.values() for r in found} == {1, 2, 3}
        assert "n3" not in listed_nodes(n1)

        cable(n3, plugged=True)
        plugged = True
        deadline = time.monotonic() + REJOIN_DEADLINE
        while listed_nodes(n1).get("n3") != "ready":
            assert time.monotonic() < deadline, "n3 did not rejoin"
            time.sleep(0.5)
        # Back: a few placement passes, and never two copies of one replica.
        for _ in range(12):
            rows = {node.name: healthy_replicas(node, name) for node in cluster}
            count = Counter(r["instance"] for found in rows.values() for r in found)
            assert all(n == 1 for n in count.values()), rows
            assert running_here(n3, name) == set(), rows  # nothing started, nothing kept
            time.sleep(0.5)
        final = wait_healthy(cluster.nodes, name, 3, time.monotonic() + 10)
        assert sorted(r["instance"] for f in final.values() for r in f) == [1, 2, 3], final
        assert final["n3"] == [], f"n3 runs {final['n3']} again"
    finally:
        if not plugged:
            cable(n3, plugged=True)
        n1.run("down", name, timeout=120)
