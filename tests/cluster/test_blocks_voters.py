"""Four nodes made one cluster on machines whose overlayd all start on the same
subnet: each node's replicas get a block of the cluster's range of their own, the
first three nodes are etcd voters and the fourth a client of them, the cluster,
the client included, keeps working when a voter dies, and when the dead voter is
removed the client becomes one."""

from __future__ import annotations

import asyncio
import json
import os
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from daemons.schedd.cluster import tls_of
from shared.cluster import config as cluster_config
from shared.cluster import pki
from shared.cluster.blocks import held
from shared.cluster.etcd import client as etcd_client
from shared.cluster.etcd import wait_healthy as wait_etcd
from tests.cluster.harness import SHARED_SUBNET, SPREAD_WEB, Cluster, Node, form, wait_healthy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 90.0
FAILOVER_DEADLINE = 40.0  # generous: a voter's death also moves the etcd leader


def records(node: Node) -> dict[str, dict[str, object]]:
    """``node ls`` as ``node`` gives it, by node name."""
    found = json.loads(node.run("node", "ls", "--format", "json", check=True).stdout)
    return {r["name"]: r for r in found["nodes"]}


def test_a_fourth_node_is_a_client_every_node_has_its_block_and_a_voter_may_die() -> None:
    with Cluster(4, etcd=False) as cluster:
        for node in cluster:
            assert node.subnet == SHARED_SUBNET  # as every machine's overlayd default
        form(cluster)
        n1, n2, n3, n4 = cluster.nodes
        listed = records(n4)
        assert {name: r["etcd_member"] for name, r in listed.items()} == {
            "n1": True,
            "n2": True,
            "n3": True,
            "n4": False,
        }
        # Each node's block: a /24 of the range, no two alike, in its record, and its
        # overlayd moved there (the bridge holds the block's gateway).
        blocks = {node.name: node.subnet for node in cluster}
        assert len(set(blocks.values())) == 4, blocks
        for node in cluster:
            block = blocks[node.name]
            assert block.prefixlen == 24 and block.subnet_of(SHARED_SUBNET), blocks
            assert listed[node.name]["subnet"] == str(block), listed
            shown = node.sh("ip", "-o", "-4", "addr", "show", "dev", node.bridge, check=True)
            assert f"{block.network_address + 1}/24" in shown.stdout, (node.name, shown.stdout)
        # handed out from the second block: the first holds every lone node's gateway
        assert blocks["n1"] == IPv4Network("10.90.1.0/24")
        assert IPv4Network("10.90.0.0/24") not in blocks.values()
        # The client was given every voter's client URL, so it outlives any one of them.
        client = cluster_config.load(n4.paths)
        assert client is not None and client.etcd is None
        voters = {f"https://{node.lan.ip}:2379" for node in (n1, n2, n3)}
        assert set(client.etcd_endpoints) == voters, client.etcd_endpoints

        name = n4.deployment_name("blocks")
        spec = n4.spec(name, SPREAD_WEB.format(name=name, replicas=4))
        n4.run("up", "-d", str(spec), "--timeout", "180", check=True)
        rows = wait_healthy(cluster.nodes, name, 4, time.monotonic() + SETTLE)
        assert sorted(len(found) for found in rows.values()) == [1, 1, 1, 1], rows
        for node in cluster:
            for row in rows[node.name]:
                assert IPv4Address(row["address"]) in blocks[node.name], (node.name, row)
        # every node reaches every node's replica at its own address, across the blocks
        for node in cluster:
            for other in cluster:
                address = rows[other.name][0]["address"]
                got = node.sh("curl", "-s", "-m", "5", f"http://{address}:8080/index.html")
                assert got.stdout.strip().startswith(name), (node.name, address, got)

        # A voter that does not lead dies: quorum (two of three) holds; the client still
        # lists, places and runs, and n2's replica runs on a survivor.
        leader = json.loads(n4.run("node", "ls", "--format", "json", check=True).stdout)
        leader_id = leader["leader"]
        killed = next(node for node in (n2, n3) if listed[node.name]["id"] != leader_id)
        survivors = [node for node in cluster if node is not killed]
        began = time.monotonic()
        killed.kill()
        after = wait_healthy(survivors, name, 4, began + FAILOVER_DEADLINE)
        took = time.monotonic() - began
        print(f"a voter killed: 4 replicas healthy on the survivors {took:.1f} s later")
        assert len(after["n4"]) >= 1, after
        deadline = time.monotonic() + 30
        while killed.name in records(n4):
            assert time.monotonic() < deadline, f"{killed.name} still listed"
            time.sleep(0.5)
        # a write through the client: the deployment goes
        n4.run("down", name, timeout=120, check=True)

        # The dead voter is removed (node rm, from the client): the client is asked to
        # become a voter, and does, so the cluster has three voters again, and the
        # removed node's block is free.
        gone = killed
        # at the first try: a call the dead voter does not answer goes on to a live one
        began = time.monotonic()
        n4.run("node", "rm", str(listed[gone.name]["id"]), check=True)
        print(f"node rm of the dead voter took {time.monotonic() - began:.1f} s")
        deadline = time.monotonic() + 60
        while True:
            now = records(n1)
            if now["n4"]["etcd_member"]:
                break
            assert time.monotonic() < deadline, f"n4 did not become a voter: {now}"
            time.sleep(0.5)
        promoted = cluster_config.load(n4.paths)
        assert promoted is not None and promoted.etcd is not None
        alive = next(node for node in (n2, n3) if node is not gone)
        assert {name: r["etcd_member"] for name, r in now.items()} == {
            "n1": True,
            alive.name: True,
            "n4": True,
        }
        # every node's cluster.toml comes to name the three voters (for its next start)
        voters = {f"https://{node.lan.ip}:2379" for node in (n1, alive, n4)}
        deadline = time.monotonic() + 40
        for node in (n1, alive, n4):
            while True:
                found = cluster_config.load(node.paths)
                if found is not None and set(found.etcd_endpoints) == voters:
                    break
                assert time.monotonic() < deadline, (node.name, found)
                time.sleep(0.5)
        # its own member answers a linearizable read (a leader, a quorum behind it)
        tls = tls_of(pki.ClusterFiles(Path(promoted.files)))
        asyncio.run(wait_etcd([f"https://{n4.lan.ip}:2379"], 30, tls))

        async def in_etcd() -> tuple[dict[str, str], list[str]]:
            async with etcd_client([f"https://{n1.lan.ip}:2379"], tls, 10) as etcd:
                return await held(etcd), [m.name async for m in etcd.members()]

        holders, members = asyncio.run(in_etcd())
        assert sorted(holders) == sorted(
            str(blocks[node.name]) for node in cluster if node is not gone
        )
        ids = {name: r["id"] for name, r in now.items()}
        assert sorted(members) == sorted(ids.values()), (members, ids)
