"""A node given a block at init or join claims only that block: while overlayd is
still on its old subnet (restarting to move), nothing is claimed or published."""

from __future__ import annotations

import asyncio

from daemons.schedd.cluster_placement import ClusterPlacement
from daemons.schedd.membership import Membership
from shared.cluster.blocks import held
from shared.cluster.etcd import client
from shared.wire import replace
from tests.etcd_fixture import EtcdCluster, etcd1  # noqa: F401  (a fixture)
from tests.integration.test_membership import record, until


def test_the_old_subnet_is_never_claimed_and_the_given_block_is_once_overlayd_moves(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(replace(record("a"), subnet="10.90.1.0/24"), etcd1.endpoints)
        await a.start()
        overlayd = {"subnet": "10.90.0.0/16"}  # the lone node's, before the restart
        asked: list[str] = []

        async def subnet() -> str:
            asked.append(overlayd["subnet"])
            return overlayd["subnet"]

        placement = ClusterPlacement(
            a._client, a, list, lambda: None, lambda *_: None, subnet=subnet
        )
        placement.start()
        try:
            async with client(etcd1.endpoints, timeout=5) as etcd:
                await until(lambda: len(asked) >= 2, 10, "overlayd asked twice")
                assert await held(etcd) == {}
                assert a.record.subnet == "10.90.1.0/24"
                overlayd["subnet"] = "10.90.1.0/24"  # overlayd came back on the block
                for _ in range(100):
                    if await held(etcd):
                        break
                    await asyncio.sleep(0.1)
                assert await held(etcd) == {"10.90.1.0/24": "a"}
                assert a.record.subnet == "10.90.1.0/24"
        finally:
            await placement.stop()
            await a.stop()

    asyncio.run(scenario())
