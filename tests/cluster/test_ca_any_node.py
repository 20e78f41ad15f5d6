"""The cluster's CA outlives the node that made it: with the init node dead, another node
makes a join token naming itself, a new node joins through it and runs replicas; and once
that node is removed (node rm), its certificate is refused at a live node's peer port."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from shared.cluster import jointoken, pki
from shared.cluster.config import PEER_PORT
from shared.cluster.peer import NodeTls, Peer, PeerError
from tests.cluster.harness import SPREAD_WEB, Cluster, Node, form, wait_healthy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 90.0


def ids(node: Node) -> dict[str, str]:
    """Node name to id, as ``node`` lists the live nodes."""
    found = json.loads(node.run("node", "ls", "--format", "json", check=True).stdout)
    return {r["name"]: r["id"] for r in found["nodes"]}


async def ping(address: str, tls: NodeTls) -> str:
    async with Peer(address, PEER_PORT, tls) as peer:
        return (await peer.ping(timeout=10)).peer


def test_with_the_init_node_dead_a_node_joins_through_another_and_rm_revokes_it(
    tmp_path: Path,
) -> None:
    # three voters first: the init node's death leaves etcd a quorum (two of three)
    with Cluster(4, etcd=False) as cluster:
        n1, n2, n3, n4 = cluster.nodes
        cluster.nodes = [n1, n2, n3]
        try:
            form(cluster)
        finally:
            cluster.nodes = [n1, n2, n3, n4]
        n1.kill()
        # etcd elects a new leader when n1 led it: until then a write times out
        deadline = time.monotonic() + 30
        while (made := n2.run("node", "join-token", "--ttl", "10m")).returncode != 0:
            assert time.monotonic() < deadline, made.stderr
            time.sleep(1)
        token = made.stdout.strip()
        assert jointoken.parse(token).address == str(n2.lan.ip)  # it names the node made on
        joined = n4.run("node", "join", token, "--advertise", str(n4.lan.ip), check=True)
        assert "joined the cluster" in joined.stderr, joined.stderr
        name = n2.deployment_name("anyca")
        spec = n2.spec(name, SPREAD_WEB.format(name=name, replicas=3))
        try:
            n2.run("up", "-d", str(spec), "--timeout", "120", check=True)
            found = wait_healthy([n2, n3, n4], name, 3, time.monotonic() + SETTLE)
            assert len(found["n4"]) == 1, found
        finally:
            n2.run("down", name, "--timeout", "60")

        # node rm n4: its certificate (kept aside: a removed node drops its files) is
        # refused at n2's peer port, which took it a moment before
        files = n4.paths.state_dir / "cluster"
        kept = pki.ClusterFiles(tmp_path / "n4")
        shutil.copytree(files, kept.directory)
        tls = NodeTls.of(kept)
        n4_id = ids(n2)["n4"]
        assert asyncio.run(ping(str(n2.lan.ip), tls)) == n4_id
        n2.run("node", "rm", n4_id, check=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                asyncio.run(ping(str(n2.lan.ip), tls))
            except PeerError as exc:
                assert str(exc).startswith(f"node {n4_id} was removed from the cluster"), exc
                break
            assert time.monotonic() < deadline, "n4's certificate still accepted"
            time.sleep(0.2)
