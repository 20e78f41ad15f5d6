"""The multi-node harness itself: three nodes on one machine, each a network
namespace on a shared test LAN with its own prefix, bus, daemons and subnet
block; a node killed outright leaves nothing behind; and a failed test's
clean-up leaves nothing either.

Where the cluster (issue 13) will change what is true today, the test says so
at the assertion to turn around.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from shared.bus import DAEMONS
from shared.cluster import etcd
from tests.cluster.harness import LAN_IFACE, Cluster, Node, sweep_abandoned

REPO = Path(__file__).resolve().parents[2]
# A test process that makes a cluster and then dies without closing it.
ABANDONING = """
import time
from tests.cluster.harness import Cluster
cluster = Cluster(1, etcd=False)
cluster.start()
print(cluster.tag, flush=True)
time.sleep(600)
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

WEB = """
version: v1
deployment: {name}
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - mkdir -p /www && echo hello-{node} > /www/index.html &&
          exec httpd -f -p 8080 -h /www
    endpoints: [{{name: http, protocol: http, port: 8080}}]
    scale: {{mode: fixed, replicas: 1}}
    stop_grace_period: 1s
    capabilities: [NET_RAW]  # busybox ping opens a raw socket
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""


def deploy_web(node: Node, name: str) -> dict[str, Any]:
    """One busybox httpd replica on ``node``, healthy: its row in ``ps --containers``."""
    spec = node.spec(name, WEB.format(name=name, node=node.name))
    node.run("up", "-d", str(spec), "--timeout", "90", check=True)
    out = node.run("ps", "--containers", "-d", name, "--format", "json", check=True)
    rows = [r for r in json.loads(out.stdout) if r["deployment"] == name]
    assert len(rows) == 1 and rows[0]["health"] == "healthy", rows
    return dict(rows[0])


def ping_from_replica(node: Node, deployment: str, address: object) -> tuple[int, str]:
    """From inside ``node``'s replica: (exit code, output) of one ping to ``address``."""
    done = node.run(
        "exec", "web", "-d", deployment, "--", "ping", "-c1", "-W2", str(address), timeout=60
    )
    return done.returncode, done.stdout + done.stderr


def fetch_from_replica(node: Node, deployment: str, address: str) -> tuple[int, str]:
    """From inside ``node``'s replica: (exit code, output) of an HTTP GET to ``address``."""
    probe = f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} 8080 2>&1"
    done = node.run("exec", "web", "-d", deployment, "--", "sh", "-c", probe, timeout=60)
    return done.returncode, done.stdout + done.stderr


def etcd_put(node: Node, key: bytes, value: bytes) -> None:
    """A write through ``node``'s member, retried while a new leader is elected."""

    async def put() -> None:
        async with etcd.client([node.etcd_endpoint], timeout=5) as store:
            await etcd.retrying(lambda: store.put(key, value), timeout=30)

    asyncio.run(put())


def etcd_get(node: Node, key: bytes) -> bytes | None:
    """A linearizable read through ``node``'s own member."""

    async def get() -> bytes | None:
        async with etcd.client([node.etcd_endpoint], timeout=5) as store:
            found = await etcd.retrying(lambda: store.get(key), timeout=30)
            return None if found is None else bytes(found.value)

    return asyncio.run(get())


def test_three_nodes_come_up_each_with_its_daemons_on_a_shared_lan(cluster: Cluster) -> None:
    names = {info.name for info in DAEMONS}
    for node in cluster:
        rows = json.loads(node.run("status", "--format", "json", check=True).stdout)
        assert {r["name"]: r["state"] for r in rows} == dict.fromkeys(names, "running")
        # Its daemons run inside its own namespace, not the host's.
        inode = os.stat(node.netns_path).st_ino
        assert all(os.stat(f"/proc/{r['pid']}/ns/net").st_ino == inode for r in rows), rows
        assert node.sh("hostname", check=True).stdout.strip() == node.name
        shown = node.sh("ip", "-o", "-4", "addr", "show", "dev", LAN_IFACE, check=True)
        assert f"{node.lan.ip}/" in shown.stdout
    # Every node reaches every other over the test LAN.
    for node in cluster:
        for other in cluster:
            if other is not node:
                assert node.ping(other.lan.ip), (node, other)
    # Each node's private bus and prefix are its own.
    assert len({n.paths.prefix for n in cluster}) == 3
    assert len({n.bridge for n in cluster}) == 3
    # One etcd over the three members: a key written through one is read through each.
    etcd_put(cluster.nodes[0], b"harness/hello", b"n1")
    for node in cluster:
        assert etcd_get(node, b"harness/hello") == b"n1"


def test_each_node_runs_its_own_replica_and_cross_node_traffic_waits_for_routes(
    cluster: Cluster,
) -> None:
    names = {node.name: node.deployment_name("web") for node in cluster}
    try:
        with ThreadPoolExecutor(len(cluster.nodes)) as pool:  # each node on its own, at once
            rows = pool.map(lambda n: deploy_web(n, names[n.name]), cluster.nodes)
            replicas = {node.name: row for node, row in zip(cluster.nodes, rows, strict=True)}
        for node in cluster:
            address = IPv4Address(replicas[node.name]["address"])
            assert address in node.subnet, (node, address)
        n1, n2, _ = cluster.nodes
        # Within a node, replicas reach each other (the probes themselves work).
        code, out = fetch_from_replica(n1, names["n1"], replicas["n1"]["address"])
        assert code == 0 and "hello-n1" in out, out
        code, out = ping_from_replica(n1, names["n1"], n1.subnet.network_address + 1)
        assert code == 0, out
        # A replica reaches the other nodes themselves over the LAN (masqueraded
        # as its node), as it would any host outside.
        code, out = ping_from_replica(n1, names["n1"], n2.lan.ip)
        assert code == 0, out
        # Across nodes, replica to replica: today a node has no route to another
        # node's block, so neither a ping nor a connection gets through.
        # CLUSTER: once overlayd routes the other nodes' blocks over the LAN (and
        # its forward chain lets them in), both reach n2's replica (hello-n2).
        other = replicas["n2"]["address"]
        route = n1.sh("ip", "route", "get", other)
        assert route.returncode != 0 and "unreachable" in route.stderr, route
        code, out = ping_from_replica(n1, names["n1"], other)
        assert code != 0 and "0 packets received" in out, out
        code, out = fetch_from_replica(n1, names["n1"], other)
        assert code != 0 and "Network is unreachable" in out, out
    finally:
        with ThreadPoolExecutor(len(cluster.nodes)) as pool:
            list(pool.map(lambda n: n.run("down", names[n.name], timeout=120), cluster.nodes))


def test_a_killed_node_leaves_nothing_behind_and_boots_again(cluster: Cluster) -> None:
    node = cluster.nodes[2]
    victim = node.deployment_name("victim")
    try:
        deploy_web(node, victim)
        # What the node holds on the machine, as the leak check finds it.
        held = node.leftovers()
        assert any(item.startswith("process ") for item in held), held
        assert any(item.startswith("mount ") for item in held), held
        assert f"netns {node.netns}" in held and f"link {node.host_veth}" in held, held
        removed = node.kill()
        assert any(item.startswith("container ") for item in removed), removed
        assert node.leftovers() == []
        # The others carry on, and etcd keeps its quorum (two members of three).
        for other in cluster.nodes[:2]:
            other.run("status", check=True)
        etcd_put(cluster.nodes[0], b"harness/while-n3-was-dead", b"yes")
    finally:
        node.restart()  # the cluster is whole again for the module's next test
        # Its disk survived: the deployment is still there (its replica back), and goes.
        down = node.run("down", victim, timeout=120)
    assert down.returncode == 0, down.stderr
    rows = json.loads(node.run("status", "--format", "json", check=True).stdout)
    assert all(r["state"] == "running" for r in rows), rows
    assert cluster.nodes[0].ping(node.lan.ip)
    # Its etcd member came back on its data and caught up.
    assert etcd_get(node, b"harness/while-n3-was-dead") == b"yes"


def test_clean_up_after_a_failing_test_leaves_nothing() -> None:
    # (no etcd member: what is checked is the replica's and the daemons' clean-up)
    with pytest.raises(RuntimeError, match="a test failed"), Cluster(1, etcd=False) as lone:
        deploy_web(lone.nodes[0], lone.nodes[0].deployment_name("web"))
        assert len(lone.leftovers()) > 5  # processes, links, namespaces, mounts, the prefix
        raise RuntimeError("a test failed with a replica running")
    assert lone.leftovers() == []


def test_a_cluster_whose_test_process_died_is_swept_by_the_next() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", ABANDONING], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        tag = child.stdout.readline().strip()
        assert tag, "the child did not bring its cluster up"
        ghost = Cluster(1, tag=tag)
        assert ghost.leftovers()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert ghost.leftovers(), "its daemons outlive it until swept"
    sweep_abandoned()
    assert ghost.leftovers() == []
