"""Daemons of cluster nodes killed and stopped in sequences, in the middle of what a
user does; after each, every live node converges to the leader's placements, with
nothing orphaned (:mod:`tests.cluster.invariants`, checked on each node).

On the shared :func:`meshed_cluster`: n1 and n2 are the etcd voters, so only their
daemons other than etcd die here (killed by PID, their supervisor starts them again);
n3, behind NAT and an etcd client only, is stopped whole (``daemon stop``) and
started again. One spread web service goes through all four sequences.

The suite's budget is tight on two cores, so one sequence runs always: a ``down``
while n3 is stopped whole, then n3 started again (down then stop, stop all then
start). The others take a few minutes together and run with
``ZLAYER_CLUSTER_CHAOS=1``: the kill in a scale up, the scale down with proxyd and
overlayd down (the one-node chaos tests kill in a scale on every run), and n3
stopped and started with a replica on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from ipaddress import IPv4Address, IPv4Network

import psutil
import pytest

from tests.cluster.harness import (
    SPREAD_WEB,
    Cluster,
    Node,
    listed_nodes,
    remove_deployment,
    wait_gone,
)
from tests.cluster.invariants import ClusterInvariants
from tests.e2e.invariants import Endpoint

SETTLE = 60.0
# n3, behind NAT, started again: its tunnels are back this soon after it is ready (its
# restarted overlayd handshakes afresh; the session its wireguard-go kept is one the
# other nodes dropped with its lapsed record, and they have no endpoint to call it at)
MESH_BACK_WITHIN = 15.0
RUNS_LAST = True  # it stops n3 whole: the other modules on the shared cluster go first
LONGER = pytest.mark.skipif(
    not os.environ.get("ZLAYER_CLUSTER_CHAOS"),
    reason="a longer sequence: ZLAYER_CLUSTER_CHAOS=1 runs it",
)
WEB = [Endpoint("web", "http", 8080, 8080)]  # SPREAD_WEB's endpoint, public through proxyd


def _ready(cluster: Cluster) -> None:
    """Until the first node lists every node ready (one started again rejoins)."""
    deadline = time.monotonic() + SETTLE
    while True:
        listed = listed_nodes(cluster[0])
        if all(listed.get(node.name) == "ready" for node in cluster):
            return
        assert time.monotonic() < deadline, listed
        time.sleep(0.3)


def _mesh_address(node: Node) -> IPv4Address:
    """``node``'s address on the mesh: its block's gateway, where logs, exec and stats
    of its replicas are dialled when it is behind NAT (its block outlives a restart)."""
    listed = json.loads(node.run("node", "ls", "--format", "json", check=True).stdout)
    subnet = next(r["subnet"] for r in listed["nodes"] if r["name"] == node.name)
    return IPv4Network(subnet).network_address + 1


def _mesh_back(cluster: Cluster, node: Node, address: IPv4Address) -> float:
    """Seconds until every other node reaches ``node`` at its mesh ``address``."""
    began = time.monotonic()
    waiting = [other for other in cluster if other is not node]
    while True:
        waiting = [other for other in waiting if not other.ping(address)]
        took = time.monotonic() - began
        if not waiting:
            return took
        names = ", ".join(other.name for other in waiting)
        assert took < MESH_BACK_WITHIN, f"{names} cannot reach {node.name} at {address}"
        time.sleep(0.2)


def _up(node: Node, name: str, replicas: int) -> None:
    spec = node.spec(name, SPREAD_WEB.format(name=name, replicas=replicas))
    node.run("up", "-d", str(spec), "--timeout", "120", check=True)


@pytest.fixture
def checker(meshed_cluster: Cluster) -> ClusterInvariants:
    found = ClusterInvariants(meshed_cluster)
    found.verbose = True
    return found


@LONGER
def test_kill_schedd_and_agentd_in_a_scale_up(
    meshed_cluster: Cluster, checker: ClusterInvariants
) -> None:
    """(a) schedd and agentd of n2 killed while a spread service scales up; then (d) a
    scale down while n2's proxyd and overlayd hang, then are killed and come back."""
    n1, n2, _n3 = meshed_cluster
    name = n1.deployment_name("chaos")
    checker.expect(name, WEB)
    try:
        _up(n1, name, 2)
        checker.settle("up of 2 replicas")
        n1.run("scale", "web", "5", "-d", name, "--no-wait", check=True)
        n2.signal_daemons(["schedd", "agentd"], signal.SIGKILL)
        took = checker.settle("schedd and agentd of n2 killed in a scale up to 5")
        print(f"settled {took:.1f}s after the kill in a scale up")
        hung = n2.signal_daemons(["proxyd", "overlayd"], signal.SIGSTOP)
        try:
            n1.run("scale", "web", "1", "-d", name, check=True)
        finally:
            for proc in hung:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        took = checker.settle("scale down to 1 while n2's proxyd and overlayd were down")
        print(f"settled {took:.1f}s after the scale down with n2's proxyd and overlayd down")
    finally:
        remove_deployment(n1, name)
    checker.settle("down")


def test_down_while_a_node_is_stopped(meshed_cluster: Cluster, checker: ClusterInvariants) -> None:
    """(b) ``down`` while n3's daemons are all stopped: once it starts, its replicas go."""
    n1, _n2, n3 = meshed_cluster
    name = n1.deployment_name("chaosdown")
    checker.expect(name, WEB)
    try:
        _up(n1, name, 3)
        checker.settle("up of 3 spread replicas")
        assert any(cid.startswith(f"{name}-") for cid in n3.containers())
        at = _mesh_address(n3)
        n3.stop()
        try:
            n1.run("down", name, "--no-wait", check=True)
        finally:
            n3.start()
        took = _mesh_back(meshed_cluster, n3, at)
        print(f"n1 and n2 reach n3 through the mesh {took:.1f}s after it is ready")
        _ready(meshed_cluster)
        took = checker.settle("down while n3 was stopped, n3 started again")
        print(f"settled {took:.1f}s after n3 came back")
        assert not any(cid.startswith(f"{name}-") for cid in n3.containers())
    finally:
        if not n3.alive:
            n3.start()
        if name in n1.run("ps", "--format", "json").stdout:
            remove_deployment(n1, name)
        else:  # down already: what n3 still runs goes now, or the shared cluster is dirty
            wait_gone(n1, name)


@LONGER
def test_stop_and_start_the_nat_node(meshed_cluster: Cluster, checker: ClusterInvariants) -> None:
    """(c) all of n3 (behind NAT) stopped and started again, with replicas placed on it."""
    n1, _n2, n3 = meshed_cluster
    name = n1.deployment_name("chaosnat")
    checker.expect(name, WEB)
    try:
        _up(n1, name, 3)
        checker.settle("up of 3 spread replicas")
        n3.stop()
        try:
            took = checker.settle("n3 stopped")
            print(f"settled {took:.1f}s after n3 stopped")
        finally:
            n3.start()
        _ready(meshed_cluster)
        took = checker.settle("n3 started again")
        print(f"settled {took:.1f}s after n3 started again")
    finally:
        if not n3.alive:
            n3.start()
        remove_deployment(n1, name)
    checker.settle("down")
