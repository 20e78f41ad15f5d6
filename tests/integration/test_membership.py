"""Node membership on real etcd: records under leases, the live node set, one leader, failover."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemons.schedd.membership import Membership
from shared.cluster.etcd import client
from shared.wire.cluster import KEYS, NodeCapacity, NodeRecord
from tests.etcd_fixture import EtcdCluster, etcd1, etcd3  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
TTL = 5  # the default: a dead node's record and leadership go within it


def record(node_id: str, **labels: str) -> NodeRecord:
    return NodeRecord(
        id=node_id,
        name=f"host-{node_id}",
        address="127.0.0.1",
        peer_port=7443,
        labels=labels,
        capacity=NodeCapacity(cpu=2.0, memory=1 << 30),
    )


async def until(check: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``check()`` holds; fails naming ``what`` after ``within`` seconds."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def leaders(*members: Membership) -> list[str]:
    return [m.record.id for m in members if m.is_leader]


def test_two_nodes_see_each_other_one_leads_and_a_revoked_lease_hands_over(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a", zone="eu"), etcd1.endpoints)
        b = Membership(record("b"), etcd1.endpoints)
        await a.start()
        await b.start()
        try:
            await until(lambda: set(a.nodes) == set(b.nodes) == {"a", "b"}, 10, "both see both")
            assert b.nodes["a"].labels == {"zone": "eu"}
            await until(lambda: len(leaders(a, b)) == 1 and a.leader == b.leader, 10, "one leader")
            leader, other = (a, b) if a.is_leader else (b, a)
            async with client(etcd1.endpoints, timeout=5) as etcd:
                held = await etcd.get(KEYS["leader"].encode())
                assert held is not None
                assert (held.value.decode(), held.lease) == (leader.record.id, leader.lease)

                # A changed record reaches the other node.
                await leader.update(record(leader.record.id, zone="us"))
                await until(
                    lambda: other.nodes[leader.record.id].labels == {"zone": "us"}, 5, "update"
                )

                # The leader's lease goes (as when etcd drops it): the other leads,
                # the old leader steps down, comes back as a node and follows.
                assert leader.lease is not None
                await etcd.revoke_lease(leader.lease)
            await until(lambda: other.is_leader, TTL + 1, "the other node leads")
            await until(lambda: not leader.is_leader, 2, "the old leader steps down")
            await until(
                lambda: leader.record.id in other.nodes and leader.leader == other.record.id,
                TTL + 2,
                "the old leader is back as a node, following",
            )
            assert leaders(a, b) == [other.record.id]
        finally:
            await a.stop()
            await b.stop()
        # Leaving revokes the lease: nothing of either node is left.
        async with client(etcd1.endpoints, timeout=5) as etcd:
            assert not await etcd.get_prefix(KEYS["nodes"].encode())
            assert await etcd.get(KEYS["leader"].encode()) is None

    asyncio.run(scenario())


def test_a_leader_whose_keepalive_stops_steps_down_before_the_other_leads(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        first = Membership(record("first"), etcd1.endpoints)
        await first.start()
        await until(lambda: first.is_leader, 10, "a lone node leads")
        second = Membership(record("second"), etcd1.endpoints)
        await second.start()
        both_led = False

        def watch() -> None:
            nonlocal both_led
            both_led = both_led or (first.is_leader and second.is_leader)

        first._on_change = second._on_change = watch  # checked at every change of either
        try:
            await until(lambda: "first" in second.nodes and second.leader == "first", 10, "follow")
            # The leader stops refreshing its lease (a node hung or cut off from etcd).
            keep = next(t for t in first._tasks if t.get_name() == "membership-_keep")
            keep.cancel()
            stopped = time.monotonic()
            await until(lambda: not first.is_leader, TTL, "the old leader steps down")
            await until(lambda: second.is_leader, TTL + 1, "the other node leads")
            took = time.monotonic() - stopped
            assert took <= TTL + 1, took
            # Its record went with its lease.
            await until(lambda: set(second.nodes) == {"second"}, 2, "the record lapses")
            assert not both_led, "two nodes led at once"
        finally:
            await first.stop()
            await second.stop()

    asyncio.run(scenario())


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from daemons.schedd.membership import Membership
    from shared.wire.cluster import NodeCapacity, NodeRecord

    async def main() -> None:
        node = NodeRecord(id="doomed", name="doomed", address="127.0.0.1", peer_port=7443,
                          capacity=NodeCapacity(cpu=1.0, memory=1 << 30))
        member = Membership(node, sys.argv[1:])
        await member.start()
        while not member.is_leader:
            await asyncio.sleep(0.02)
        print("leading", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.fixture
def doomed_leader(etcd1: EtcdCluster) -> Iterator[subprocess.Popen[str]]:  # noqa: F811
    """A node process that joins, leads, and is then ours to kill."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, *etcd1.endpoints],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "leading"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_a_node_killed_outright_loses_its_record_and_leadership_within_the_lease(
    etcd1: EtcdCluster,  # noqa: F811
    doomed_leader: subprocess.Popen[str],
) -> None:
    async def scenario() -> None:
        survivor = Membership(record("survivor"), etcd1.endpoints)
        await survivor.start()
        try:
            await until(lambda: survivor.leader == "doomed", 10, "the first node leads")
            assert set(survivor.nodes) == {"doomed", "survivor"}
            doomed_leader.kill()
            killed = time.monotonic()
            await until(lambda: survivor.is_leader, TTL + 1, "the survivor leads")
            await until(lambda: set(survivor.nodes) == {"survivor"}, TTL + 1, "the record goes")
            assert time.monotonic() - killed <= TTL + 1
        finally:
            await survivor.stop()

    asyncio.run(scenario())


def test_membership_rides_out_the_loss_of_an_etcd_member(
    etcd3: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a"), etcd3.endpoints)
        b = Membership(record("b"), etcd3.endpoints)
        await a.start()
        await b.start()
        try:
            await until(lambda: len(leaders(a, b)) == 1 and set(a.nodes) == {"a", "b"}, 10, "up")
            leader = leaders(a, b)[0]
            lost_lease = False

            def watch() -> None:
                nonlocal lost_lease
                lost_lease = lost_lease or a.lease is None or b.lease is None

            a._on_change = b._on_change = watch
            etcd3.kill(0)  # the two left keep quorum
            # Two leases' time later, both nodes are still there, the same one leads.
            await asyncio.sleep(2 * TTL)
            assert set(a.nodes) == set(b.nodes) == {"a", "b"}
            assert leaders(a, b) == [leader]
            assert not lost_lease
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())
