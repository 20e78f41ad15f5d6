"""A call to a replica of another node works out where to dial that node once: the
address it names to people and the one its channel dials are the same."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from shared.bus import UnavailableError
from shared.cluster import peer, pki, remote
from shared.cluster.locate import Placed
from shared.cluster.peer import NodeTls
from shared.cluster.remote import NodeReach
from shared.paths import Paths
from shared.wire.agent import ReplicaInfo
from shared.wire.cluster import NodeCapacity, NodeRecord

KEY = "x" * 43 + "="  # a WireGuard key's shape: only its presence matters here


def record(node_id: str, *, reachable: bool = True, subnet: str = "") -> NodeRecord:
    return NodeRecord(
        id=node_id,
        name=node_id.removeprefix("node-"),
        address="192.0.2.10" if node_id == "node-a" else "192.0.2.20",
        peer_port=9480,
        capacity=NodeCapacity(cpu=1.0, memory=1 << 30),
        subnet=subnet,
        wireguard_key=KEY,
        reachable=reachable,
    )


def node_files(files: pki.ClusterFiles, node_id: str = "node-b") -> pki.Authority:
    """A node's cluster files as init writes them; the authority that signed them."""
    authority = pki.Authority.make()
    files.write_ca_certificate(authority.certificate)
    files.write_node(*authority.issue(node_id, ["192.0.2.20"]))
    return authority


class _ReadyChannel:
    async def channel_ready(self) -> None:
        return None

    async def close(self) -> None:
        return None


def test_the_peer_address_is_worked_out_once_per_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    dialled: list[tuple[str, int, str | None]] = []
    real_peer_address = peer.peer_address

    def peer_address(node: NodeRecord, caller: NodeRecord | None) -> str:
        asked.append(node.id)
        return real_peer_address(node, caller)

    def channel(
        address: str, port: int, tls: NodeTls, expect_node: str | None = None, options: Any = None
    ) -> _ReadyChannel:
        dialled.append((address, port, expect_node))
        return _ReadyChannel()

    monkeypatch.setattr(peer, "peer_address", peer_address)
    monkeypatch.setattr(remote, "peer_address", peer_address)
    monkeypatch.setattr(peer, "channel", channel)

    behind = record("node-a", reachable=False, subnet="10.89.3.0/24")  # behind NAT
    replica = ReplicaInfo(
        id="shop-web-1-r1",
        deployment="shop",
        service="web",
        instance=1,
        revision=1,
        image="zlayer/busybox:latest",
        state="running",
        node="node-a",
    )
    placed = Placed(replica, here=False, node=behind, caller=record("node-b"))
    reach = NodeReach(Paths(tmp_path))
    node_files(reach.files)

    _chan, where = asyncio.run(reach._channel(placed))

    assert asked == ["node-a"]
    assert dialled == [("10.89.3.1", 9480, "node-a")]
    assert where == "node a (10.89.3.1:9480) through the mesh"


def test_a_call_after_the_certificate_was_renewed_in_place_shows_the_new_one(
    tmp_path: Path,
) -> None:
    """apid reaches other nodes' replicas for months; schedd renews the node's certificate
    in place long before it ends, and the next call must not show the old one."""
    reach = NodeReach(Paths(tmp_path))
    authority = node_files(reach.files)

    first = asyncio.run(reach.tls())
    assert asyncio.run(reach.tls()) is first  # unchanged files: not read again
    assert first.cert == reach.files.node_cert.read_bytes()

    reach.files.write_node(*authority.issue("node-b", ["192.0.2.20"]))
    # written a moment ago: maybe half of a renewal, so the next call still shows the old
    assert asyncio.run(reach.tls()) is first
    settled = time.time_ns() - 2_000_000_000
    for path in (reach.files.ca_cert, reach.files.node_key, reach.files.node_cert):
        os.utime(path, ns=(settled, settled))
    renewed = asyncio.run(reach.tls())
    assert renewed.cert == reach.files.node_cert.read_bytes() != first.cert
    assert renewed.key == reach.files.node_key.read_bytes() != first.key


def test_a_node_without_its_certificate_is_told_in_a_sentence(tmp_path: Path) -> None:
    reach = NodeReach(Paths(tmp_path))
    with pytest.raises(UnavailableError, match=r"does not exist; this node is not in a cluster"):
        asyncio.run(reach.tls())
