"""The etcd client on real members: when the member it uses stops answering without
closing its connections (a host cut off: here the member frozen with SIGSTOP), a call
is answered by another member within seconds, not after keepalive gives the member up;
and a running client follows the members, so it outlives the ones it was given."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Iterator

import pytest

from daemons.schedd.etcdstore import EtcdStore
from daemons.schedd.membership import DEFAULT_TTL, Membership
from shared.cluster.etcd import FOLLOW_EVERY, Client, client, retrying
from shared.wire.cluster import NodeCapacity, NodeRecord
from tests.etcd_fixture import EtcdCluster, etcd3  # noqa: F401  (a fixture)

# Generous: one try waits ATTEMPT_TIMEOUT (2 s) on the frozen member; before the
# fix the call waited for keepalive (10 s + 5 s) or its own timeout.
BOUND = 8.0
CALL_TIMEOUT = 20.0  # each call's own, longer than BOUND: the bound is the client's doing
FOLLOW = 0.5  # seconds between the test client's looks at the members


async def _leader_index(cluster: EtcdCluster) -> int:
    async with client(cluster.endpoints, timeout=10, follow=None) as c:
        leader = (await retrying(c.status, 10)).leader.id
        names = {m.id: m.name async for m in c.members()}
    return [m.name for m in cluster.members].index(names[leader])


class _Frozen:
    """A member stopped with SIGSTOP (its sockets stay open, it answers nothing)."""

    def __init__(self, cluster: EtcdCluster, index: int) -> None:
        self.pid = cluster.processes[cluster.members[index].name].pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def __exit__(self, *_: object) -> None:
        os.kill(self.pid, signal.SIGCONT)  # the fixture kills it by PID at the end


@pytest.fixture
def frozen_first(etcd3: EtcdCluster) -> Iterator[tuple[EtcdCluster, list[str], int]]:  # noqa: F811
    """The cluster, its endpoints with a member that does not lead first, and that member."""
    leader = asyncio.run(_leader_index(etcd3))
    first = next(i for i in range(3) if i != leader)
    urls = [etcd3.endpoints[first], *(u for i, u in enumerate(etcd3.endpoints) if i != first)]
    yield etcd3, urls, first


async def _within(call: Awaitable[object], bound: float) -> float:
    began = time.monotonic()
    await asyncio.wait_for(call, bound)
    return time.monotonic() - began


def test_a_call_right_after_its_member_freezes_is_answered_by_another_within_seconds(
    frozen_first: tuple[EtcdCluster, list[str], int],
) -> None:
    cluster, urls, first = frozen_first

    async def run() -> None:
        async with client(urls, timeout=CALL_TIMEOUT) as c:
            await c.put(b"/zlayer/test/before", b"1")  # the channel is up, on the first member
            with _Frozen(cluster, first):
                took = await _within(c.put(b"/zlayer/test/after", b"2"), BOUND)
                print(f"a put right after the member froze took {took:.1f} s")
                got = await asyncio.wait_for(c.get(b"/zlayer/test/after"), BOUND)
                assert got is not None and got.value == b"2"
                # later calls go to the member that answered, at once
                await _within(c.get(b"/zlayer/test/before"), 1.5)

    asyncio.run(run())


def test_a_watch_on_the_frozen_member_ends_and_a_new_one_sees_writes(
    frozen_first: tuple[EtcdCluster, list[str], int],
) -> None:
    cluster, urls, first = frozen_first
    key = b"/zlayer/test/watched"

    async def run() -> None:
        async with client(urls, timeout=CALL_TIMEOUT, follow=FOLLOW) as c:
            watch = await c.watch(key)
            with _Frozen(cluster, first):
                # Nothing calls: the client's own look at the members finds the member
                # gone, and the watch on it ends with an error, so its owner watches again.
                async def ends() -> None:
                    async for _ in watch:
                        pass

                began = time.monotonic()
                with pytest.raises(Exception, match="stopped answering"):
                    await _within(ends(), BOUND)
                print(
                    f"the watch on the frozen member ended {time.monotonic() - began:.1f} s later"
                )
                again = await asyncio.wait_for(c.watch(key), BOUND)
                await asyncio.wait_for(c.put(key, b"seen"), BOUND)
                event = await asyncio.wait_for(anext(aiter(again)), BOUND)
                assert event.kv.value == b"seen"
                await again.cancel()

    asyncio.run(run())


def test_a_client_given_one_member_follows_the_members_and_outlives_it(
    etcd3: EtcdCluster,  # noqa: F811
) -> None:
    """As a node that started when one voter existed: the voters that joined later are
    reached once the one it was given is gone, without a restart."""

    async def run() -> None:
        async with client(etcd3.endpoints[:1], timeout=CALL_TIMEOUT, follow=FOLLOW) as c:
            await c.put(b"/zlayer/test/k", b"1")
            deadline = time.monotonic() + 10
            while sorted(c.endpoints) != sorted(etcd3.endpoints):
                assert time.monotonic() < deadline, c.endpoints
                await asyncio.sleep(0.1)
            # the member it was given dies (SIGKILL: its connections close)
            await asyncio.to_thread(etcd3.kill, 0)
            await _within(retrying(lambda: c.put(b"/zlayer/test/k", b"2"), BOUND), BOUND)
            got = await asyncio.wait_for(c.get(b"/zlayer/test/k"), BOUND)
            assert got is not None and got.value == b"2"
            # a killed member is still a member: the client keeps it, and goes past it
            assert sorted(c.endpoints) == sorted(etcd3.endpoints), c.endpoints

    asyncio.run(run())


def test_schedds_store_given_one_member_follows_the_members_and_outlives_it(
    etcd3: EtcdCluster,  # noqa: F811
) -> None:
    """A running schedd's store (its client as schedd makes it): the voters that joined
    after it started are reached once the one in its cluster.toml is gone."""
    store = EtcdStore(etcd3.endpoints[:1], timeout=10)
    try:
        store.add_revision("web", "{}", "", "web.toml")
        deadline = time.monotonic() + 3 * FOLLOW_EVERY
        while sorted(store.endpoints) != sorted(etcd3.endpoints):
            assert time.monotonic() < deadline, store.endpoints
            time.sleep(0.2)
        etcd3.kill(0)
        began = time.monotonic()
        found = store.get("web")
        assert found is not None and found.revision == 1
        assert store.add_revision("web", "{}", "", "web.toml") == 2
        assert time.monotonic() - began < BOUND
    finally:
        store.close()


def test_schedds_membership_given_one_member_keeps_its_lease_when_that_member_freezes(
    frozen_first: tuple[EtcdCluster, list[str], int],
) -> None:
    """Two nodes that started when one member (not the leader) existed: when it
    freezes, their leases are refreshed through the members that joined later in
    time, and neither loses its lease nor the leadership moves."""
    cluster, urls, first = frozen_first

    def record(node_id: str) -> NodeRecord:
        return NodeRecord(
            id=node_id,
            name=node_id,
            address="127.0.0.1",
            peer_port=7443,
            capacity=NodeCapacity(cpu=1.0, memory=1 << 30),
        )

    async def run() -> None:
        nodes = [Membership(record(name), urls[:1]) for name in ("a", "b")]
        for node in nodes:
            await node.start()
        try:
            deadline = time.monotonic() + 3 * FOLLOW_EVERY
            while any(len(n._client.endpoints) < 3 for n in nodes) or not any(
                n.is_leader for n in nodes
            ):
                assert time.monotonic() < deadline, [n._client.endpoints for n in nodes]
                await asyncio.sleep(0.1)
            leader = [n.record.id for n in nodes if n.is_leader]
            leases = [n.lease for n in nodes]
            lost: list[str] = []

            def seen() -> None:
                lost.extend(n.record.id for n in nodes if n.lease is None or n.fenced)

            for node in nodes:
                node._on_change = seen
            with _Frozen(cluster, first):
                await asyncio.sleep(2 * DEFAULT_TTL)
                assert lost == [] and [n.lease for n in nodes] == leases
                assert [n.record.id for n in nodes if n.is_leader] == leader
                assert all(set(n.nodes) == {"a", "b"} for n in nodes)
        finally:
            for node in nodes:
                await node.stop()

    asyncio.run(run())


def test_a_client_follows_a_member_removed_from_the_cluster(
    etcd3: EtcdCluster,  # noqa: F811
) -> None:
    async def run() -> None:
        async with client(etcd3.endpoints, timeout=CALL_TIMEOUT, follow=FOLLOW) as c:
            name = etcd3.members[2].name
            (gone,) = [m async for m in c.members() if m.name == name]
            await retrying(lambda: c.remove_member(gone.id), 10)
            deadline = time.monotonic() + 10
            while etcd3.endpoints[2] in c.endpoints:
                assert time.monotonic() < deadline, c.endpoints
                await asyncio.sleep(0.1)
            assert sorted(c.endpoints) == sorted(etcd3.endpoints[:2])
            await asyncio.wait_for(c.put(b"/zlayer/test/k", b"1"), BOUND)

    asyncio.run(run())


def test_a_client_that_does_not_follow_keeps_the_members_it_was_given(
    etcd3: EtcdCluster,  # noqa: F811
) -> None:
    async def run() -> None:
        c: Client
        async with client(etcd3.endpoints[:1], timeout=CALL_TIMEOUT, follow=None) as c:
            await c.put(b"/zlayer/test/k", b"1")
            await asyncio.sleep(FOLLOW_EVERY + 0.5)  # past a following client's first look
            assert c.endpoints == etcd3.endpoints[:1]

    asyncio.run(run())
