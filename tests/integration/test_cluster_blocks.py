"""The cluster's blocks on real etcd: taken in one transaction each, never twice, kept
by their node, freed by its removal; the settings written once; the voter decision
against a real member list."""

from __future__ import annotations

import asyncio

import pytest

from shared.cluster.blocks import (
    BlocksError,
    allocate,
    held,
    is_voter,
    load_settings,
    make_settings,
    release,
    save_settings,
)
from shared.cluster.etcd import client
from tests.etcd_fixture import EtcdCluster, etcd1, etcd3  # noqa: F401  (fixtures)


def test_nodes_racing_for_blocks_each_get_their_own_and_keep_it(
    etcd3: EtcdCluster,  # noqa: F811
) -> None:
    settings = make_settings("10.90.0.0/20")  # 16 blocks of /24

    async def scenario() -> None:
        # one client a node, each on another member: the race goes through etcd
        clients = [client([etcd3.endpoints[k % 3]], timeout=10) for k in range(12)]
        try:
            got = await asyncio.gather(
                *(allocate(c, settings, f"node-{k}") for k, c in enumerate(clients))
            )
            assert len(set(got)) == 12, got
            assert all(block.startswith("10.90.") and block.endswith("/24") for block in got)
            holders = await held(clients[0])
            assert holders == {block: f"node-{k}" for k, block in enumerate(got)}
            # asked again (a restart, a join retried): the same block, nothing new taken
            assert await allocate(clients[5], settings, "node-3") == got[3]
            assert len(await held(clients[0])) == 12
            # handed out lowest first, the first block last: 10.90.1 to 10.90.12
            assert sorted(got) == sorted(f"10.90.{k}.0/24" for k in range(1, 13))
            # removed: its block is free, and the next node gets it (the lowest free)
            assert await release(clients[1], "node-3") == [got[3]]
            assert await allocate(clients[2], settings, "node-new") == got[3]
        finally:
            for c in clients:
                await c.close()

    asyncio.run(scenario())


def test_a_full_range_refuses_with_a_sentence_and_the_preferred_block_is_kept(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    settings = make_settings("10.91.0.0/23")  # 2 blocks

    async def scenario() -> None:
        async with client(etcd1.endpoints, timeout=10) as c:
            assert await allocate(c, settings, "first", prefer="10.91.0.0/24") == "10.91.0.0/24"
            assert await allocate(c, settings, "second", prefer="10.91.0.0/24") == "10.91.1.0/24"
            with pytest.raises(BlocksError, match="every block of the cluster subnet"):
                await allocate(c, settings, "third")
            # a release that names another node frees nothing
            assert await release(c, "nobody") == []
            assert len(await held(c)) == 2

    asyncio.run(scenario())


def test_settings_are_written_once_and_decide_who_votes(
    etcd3: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        async with client(etcd3.endpoints, timeout=10) as c:
            assert await load_settings(c) is None
            five = make_settings("10.92.0.0/16", voters=5)
            assert await save_settings(c, five) == five
            # a second init's settings do not replace the cluster's
            assert await save_settings(c, make_settings("10.93.0.0/16")) == five
            found = await load_settings(c)
            assert found == five
            members = len([m async for m in c.members()])
            assert members == 3
            assert is_voter(members, found)  # 3 of 5: the next node votes
            assert not is_voter(members, make_settings("10.92.0.0/16", voters=3))

    asyncio.run(scenario())
