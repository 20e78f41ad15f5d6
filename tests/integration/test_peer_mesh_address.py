"""Calls to a node the others cannot reach first (behind NAT) go to its mesh address, on
loopback with real peer servers: a server started as schedd starts it answers the peer
port at its mesh address (the gateway of its block) as well as its advertised one, its
certificate checked for the node's id there; the join port stays on the advertised
address; a caller without a mesh dials the advertised address and gets one sentence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from shared.bus import UnavailableError
from shared.cluster import pki
from shared.cluster.locate import Placed
from shared.cluster.peer import (
    PING,
    NodeTls,
    PeerError,
    PeerServer,
    call,
    channel,
    node_channel,
    peer_address,
    wildcard,
)
from shared.cluster.remote import CONNECT_TIMEOUT, NodeReach
from shared.paths import Paths
from shared.wire.agent import ReplicaInfo
from shared.wire.cluster import NodeCapacity, NodeRecord, PingReply, PingRequest

KEY = "x" * 43 + "="  # a WireGuard key's shape: only its presence matters here
MESH = "127.0.5.1"  # the gateway of 127.0.5.0/24, on loopback as on a mesh interface


class Certs:
    """A cluster CA with two nodes: ``a`` answers, ``b`` calls."""

    def __init__(self, root: Path) -> None:
        self.a = pki.ClusterFiles(root / "a" / "cluster")
        authority = pki.init_cluster(self.a, "node-a", ["127.0.0.1"])
        self.b_paths = Paths(root / "b")
        self.b = pki.ClusterFiles.of(self.b_paths)
        key = pki.make_key()
        certificate = authority.sign(pki.make_csr(key, "node-b", ["127.0.0.1"]))
        self.b.write_ca_certificate(authority.certificate)
        self.b.write_node(key, certificate)


def record(
    node_id: str, port: int, *, reachable: bool = True, key: str = KEY, subnet: str = ""
) -> NodeRecord:
    return NodeRecord(
        id=node_id,
        name=node_id.removeprefix("node-"),
        address="127.0.0.1",
        peer_port=port,
        capacity=NodeCapacity(cpu=1.0, memory=1 << 30),
        subnet=subnet,
        wireguard_key=key,
        reachable=reachable,
        reachability="" if reachable else "it is behind NAT",
    )


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_the_address_of_a_node_behind_nat_is_its_mesh_address_from_a_node_with_a_mesh() -> None:
    behind = record("node-a", 9480, reachable=False, subnet="10.89.3.0/24")
    meshed, plain = record("node-b", 9480), record("node-b", 9480, key="")
    assert peer_address(behind, meshed) == "10.89.3.1"
    # no mesh here, or none there, or not known: its advertised address (and the sentence)
    assert peer_address(behind, plain) == "127.0.0.1"
    assert peer_address(behind, None) == "127.0.0.1"
    assert peer_address(record("node-a", 9480, reachable=False, key=""), meshed) == "127.0.0.1"
    # a node the others reach directly is called there, mesh or not
    assert peer_address(record("node-a", 9480, subnet="10.89.3.0/24"), meshed) == "127.0.0.1"
    assert wildcard("10.0.0.11") == "0.0.0.0" and wildcard("fd00::11") == "::"


def test_a_node_behind_nat_answers_calls_at_its_mesh_address(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    tls_a = NodeTls.of(certs.a)
    tls_b = NodeTls.of(certs.b)
    behind = record("node-a", 0, reachable=False, subnet="127.0.5.0/24")
    caller = record("node-b", 0)

    async def ping(node: NodeRecord, expect: str | None = None) -> PingReply:
        where = f"node {node.id}"
        if expect is None:
            chan = node_channel(node, caller, tls_b)
        else:  # as node_channel does, but checking the certificate for another id
            chan = channel(peer_address(node, caller), node.peer_port, tls_b, expect)
        async with chan:
            return await call(chan, PING, PingRequest(), PingReply, 5, where)

    async def scenario() -> None:
        # as schedd starts it: the join port on the advertised address, the peer port on all
        server = PeerServer("node-a", tls_a)
        await server.start("127.0.0.1", peer_host=wildcard("127.0.0.1"))
        try:
            node = msgspec.structs.replace(behind, peer_port=server.peer_port)
            reply = await ping(node)
            assert (reply.node, reply.peer) == ("node-a", "node-b")
            # the server's certificate names node-a, not the mesh address: asked for
            # another node there, refused
            with pytest.raises(PeerError, match="cannot reach node node-a over TLS"):
                await ping(node, expect="node-c")
            # the join port is not on the mesh address
            reader = asyncio.open_connection(MESH, server.join_port)
            with pytest.raises(OSError):
                await asyncio.wait_for(reader, 5)
        finally:
            await server.stop(None)
        # a server on the advertised address only does not answer there (what schedd did)
        server = PeerServer("node-a", tls_a)
        await server.start("127.0.0.1", join_port=None)
        try:
            node = msgspec.structs.replace(behind, peer_port=server.peer_port)
            with pytest.raises(PeerError, match="cannot reach node node-a"):
                await ping(node)
        finally:
            await server.stop(None)

    run(scenario)


def test_a_caller_without_a_mesh_says_why_it_cannot_reach_a_node_behind_nat(
    tmp_path: Path,
) -> None:
    certs = Certs(tmp_path)
    # behind NAT at an address nothing answers on: as seen from a node without a mesh
    behind = msgspec.structs.replace(
        record("node-a", 9, reachable=False, subnet="127.0.5.0/24"), address="127.0.0.1"
    )
    replica = ReplicaInfo(
        id="far-talk-1-r1",
        deployment="far",
        service="talk",
        instance=1,
        revision=1,
        image="zlayer/busybox:latest",
        state="running",
        node="node-a",
    )

    async def scenario() -> None:
        reach = NodeReach(certs.b_paths)
        placed = Placed(replica, here=False, node=behind, caller=record("node-b", 0, key=""))
        began = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            _ = [c async for c in reach.logs(placed, tail=1)]
        assert time.monotonic() - began < CONNECT_TIMEOUT + 5
        said = str(caught.value)
        assert said == (
            "node a (127.0.0.1:9) cannot be reached from other nodes (it is behind NAT) and "
            "this node has no mesh to reach it through, so its replica far-talk-1-r1 cannot "
            "be reached; turn the mesh on (schedd's [cluster] mesh) or pick a replica on "
            "another node"
        ), said

    run(scenario)
