"""The harness's routed topology without daemons: who reaches whom, and the clean-up.

Only the network is made (the router, the NAT namespace and each node's link);
no daemon starts, so this takes a second.
"""

from __future__ import annotations

import os
import subprocess

import psutil
import pytest

from shared.busybox_image import BUSYBOX
from tests.cluster.harness import OWNER, Cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def plug(cluster: Cluster) -> None:
    """The network of ``cluster`` as its start makes it, without the daemons."""
    cluster.root.mkdir()
    me = psutil.Process()
    (cluster.root / OWNER).write_text(f"{me.pid} {me.create_time()}\n")
    cluster._make_router()
    for node in cluster:
        node._plug()
        node.workdir.mkdir(parents=True, exist_ok=True)


def test_routed_nodes_reach_each_other_through_the_router_and_not_behind_nat() -> None:
    cluster = Cluster(3, etcd=False, topology="routed", nat=[2])
    n1, n2, n3 = cluster
    try:
        plug(cluster)
        # every node on a link of its own: no two share a network
        assert len({node.lan.network for node in cluster}) == 3
        assert n1.ping(n2.lan.ip) and n2.ping(n1.lan.ip)
        assert n3.ping(n1.lan.ip)  # out through its NAT
        assert not n1.ping(n3.lan.ip)  # nothing reaches in
        host = subprocess.run(
            [str(BUSYBOX), "ping", "-c1", "-W2", str(n2.lan.ip)], capture_output=True, check=False
        )
        assert host.returncode == 0, "the host reaches the nodes through the router"
        # the router has no route to the private address behind the NAT
        assert cluster.in_router("ip", "route", "get", str(n3.lan.ip)).returncode != 0
    finally:
        cluster.close()
    assert cluster.leftovers() == []


def test_a_failed_routed_cluster_leaves_nothing() -> None:
    cluster = Cluster(2, etcd=False, topology="routed", nat=[1])
    with pytest.raises(RuntimeError, match="a test failed"):
        try:
            plug(cluster)
            raise RuntimeError("a test failed")
        finally:
            cluster.close()
    assert cluster.leftovers() == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert cluster.router_netns not in listed.stdout
    assert f"zlt-c{cluster.tag}-nat2" not in listed.stdout
