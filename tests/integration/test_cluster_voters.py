"""The voter decision of node join on real etcd members: a joining node is an etcd
voter while the members are fewer than the cluster's voters (3 unless node init said
5 or 7), else a client given every member's client URL."""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemons.schedd.cluster import NodeControl
from shared.cluster.blocks import make_settings, save_settings
from shared.cluster.etcd import client
from shared.paths import Paths
from shared.wire import encode
from shared.wire.cluster import KEYS
from tests.etcd_fixture import EtcdCluster, etcd3  # noqa: F401  (a fixture)


def test_a_fourth_node_is_a_client_of_three_voters_and_a_voter_of_five(
    etcd3: EtcdCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    control = NodeControl(Paths(tmp_path), daemon=None)  # type: ignore[arg-type]
    one = etcd3.endpoints[:1]  # what a join token's node hands out may be one member

    async def scenario() -> None:
        async with client(etcd3.endpoints, timeout=10) as etcd:
            await save_settings(etcd, make_settings("10.90.0.0/16"))
            member, endpoints = await control._maybe_voter("d-4", "127.0.0.1", one, None)  # type: ignore[arg-type]
            # a client, of every member: it outlives the loss of any one
            assert member is None
            assert sorted(endpoints) == sorted(etcd3.endpoints)
            assert len([m async for m in etcd.members()]) == 3

            five = make_settings("10.90.0.0/16", voters=5)
            await etcd.put(KEYS["cluster"].encode(), encode(five).encode())
            member, endpoints = await control._maybe_voter("d-5", "127.0.0.1", one, None)  # type: ignore[arg-type]
            assert member is not None and member.initial_state == "existing"
            assert set(member.initial_cluster) == {"m0", "m1", "m2", "d-5"}
            listed = [m async for m in etcd.members()]
            assert len(listed) == 4  # added, to start with the state "existing"
            assert [m.peer_urls for m in listed if not m.name] == [["https://127.0.0.1:2380"]]

    asyncio.run(scenario())
