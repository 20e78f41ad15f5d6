"""The leader's placement passes on real etcd: per-node placements, generations, a deposed
leader's write refused, and a node following its own placements."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from daemons.schedd.cluster_placement import (
    ClusterPlacement,
    NotLeaderError,
    current_placements,
    instance_of,
    placement_pass,
    write_plan,
)
from daemons.schedd.membership import Membership
from daemons.schedd.placement import Demand, Group, Plan
from shared.cluster.etcd import client
from shared.wire import encode
from shared.wire.agent import ReplicaInfo
from shared.wire.cluster import KEYS, NodePlacements, Placement
from tests.etcd_fixture import EtcdCluster, etcd1  # noqa: F401  (a fixture)
from tests.integration.test_membership import TTL, record, until


def web(replicas: int, cpu: float = 0.0) -> Demand:
    group = Group(replicas, cpu=cpu, affinity="spread")
    return Demand(deployment="app", service="web", revision=1, groups=(group,))


async def leading(a: Membership, b: Membership) -> tuple[Membership, Membership]:
    await until(lambda: set(a.nodes) == set(b.nodes) == {"a", "b"}, 10, "both see both")
    await until(lambda: a.is_leader != b.is_leader and a.leader == b.leader, 10, "one leader")
    return (a, b) if a.is_leader else (b, a)


def test_the_leader_writes_one_placement_per_node_and_a_deposed_leader_cannot(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a"), etcd1.endpoints)
        b = Membership(record("b"), etcd1.endpoints)
        await a.start()
        await b.start()
        try:
            leader, other = await leading(a, b)
            async with client(etcd1.endpoints, timeout=5) as etcd:
                _, generation = await placement_pass(
                    etcd, leader.record.id, leader.lease, leader.live(), [web(4)]
                )
                assert generation == 1
                written = await current_placements(etcd)
                assert set(written) == {"a", "b"}
                # spread: two replicas on each node, every instance once
                assert [len(written[n].replicas) for n in ("a", "b")] == [2, 2]
                names = sorted(p.replica for doc in written.values() for p in doc.replicas)
                assert names == [f"app-web-{i}" for i in range(1, 5)]
                assert {doc.generation for doc in written.values()} == {1}

                # The same wants again: nothing to write, the generation stays.
                _, again = await placement_pass(
                    etcd, leader.record.id, leader.lease, leader.live(), [web(4)]
                )
                assert again is None

                # The node that does not lead cannot write, whatever it holds.
                try:
                    await placement_pass(etcd, other.record.id, other.lease, other.live(), [web(1)])
                    raise AssertionError("a node that does not lead wrote placements")
                except NotLeaderError:
                    pass

                # The leader's lease goes: the other leads; the old leader, with the
                # lease it won under, is refused, and nothing it meant reaches etcd.
                deposed, lease = leader, leader.lease
                assert lease is not None
                await etcd.revoke_lease(lease)
                await until(lambda: other.is_leader, TTL + 1, "the other node leads")
                try:
                    await write_plan(
                        etcd,
                        deposed.record.id,
                        lease,
                        Plan(nodes={"a": [], "b": []}, pending=[]),
                        written,
                    )
                    raise AssertionError("a deposed leader wrote placements")
                except NotLeaderError:
                    pass
                assert await current_placements(etcd) == written

                # The new leader scales down: a higher generation, instances 1 and 2 kept
                # where they were.
                await until(lambda: set(other.live()) == {"a", "b"}, TTL + 2, "both back")
                _, generation = await placement_pass(
                    etcd, other.record.id, other.lease, other.live(), [web(2)]
                )
                assert generation == 2
                now = await current_placements(etcd)
                where = {p.replica: n for n, doc in now.items() for p in doc.replicas}
                before = {p.replica: n for n, doc in written.items() for p in doc.replicas}
                assert where == {k: before[k] for k in ("app-web-1", "app-web-2")}
                assert {doc.generation for doc in now.values()} == {2}
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_a_replica_that_fits_nowhere_is_pending_with_the_reason(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a"), etcd1.endpoints)
        await a.start()
        try:
            await until(lambda: a.is_leader, 10, "a leads")
            events: list[tuple[str, str, str, str]] = []
            placement = ClusterPlacement(
                a._client, a, lambda: [web(1, cpu=8.0)], lambda: None, record_to(events)
            )
            assert await placement.place_once() == 1
            assert placement.pending_reason("app", "web") == (
                "1 replica pending: no node has 8 CPUs free; the largest has 2"
            )
            assert events == [
                (
                    "app",
                    "pending",
                    "1 replica of web pending: no node has 8 CPUs free; the largest has 2",
                    "web",
                )
            ]
        finally:
            await a.stop()

    asyncio.run(scenario())


def record_to(events: list[tuple[str, str, str, str]]) -> Callable[[str, str, str, str], None]:
    def add(deployment: str, kind: str, message: str, service: str) -> None:
        events.append((deployment, kind, message, service))

    return add


def placed(node: str, generation: int, *instances: int) -> NodePlacements:
    return NodePlacements(
        node=node,
        generation=generation,
        replicas=[
            Placement(deployment="app", service="web", replica=f"app-web-{i}", revision=1)
            for i in instances
        ],
    )


def test_a_node_follows_its_own_placements_by_generation_and_sees_the_others_replicas(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        b = Membership(record("b"), etcd1.endpoints)
        await b.start()
        changes: list[int] = []
        placement = ClusterPlacement(b._client, b, list, lambda: changes.append(1), lambda *_: None)
        placement.start()
        key = (KEYS["assignments"] + "b").encode()
        try:
            async with client(etcd1.endpoints, timeout=5) as etcd:
                # Nothing placed yet: known once read, and it runs nothing.
                await until(lambda: placement.known, 5, "its placements read")
                assert placement.instances("app", "web") == []

                await etcd.put(key, encode(placed("b", 5, 2, 4)).encode())
                await until(lambda: placement.instances("app", "web") == [2, 4], 5, "gen 5")
                # An older generation (a leader that was deposed meanwhile) is ignored.
                await etcd.put(key, encode(placed("b", 4, 1, 2, 3, 4)).encode())
                await etcd.put(key, encode(placed("b", 6, 4)).encode())
                await until(lambda: placement.instances("app", "web") == [4], 5, "gen 6")
                assert placement.owned is not None and placement.owned.generation == 6
                # Its document removed (the leader took it for gone): it owns nothing.
                await etcd.delete(key)
                await until(lambda: placement.instances("app", "web") == [], 5, "owns nothing")

                # Its replicas go out under its lease; another node's come in.
                mine = replica("app-web-4-r1", 4, "10.89.1.2")
                await placement.publish([mine])
                got = await etcd.get((KEYS["replicas"] + "b/app-web-4-r1").encode())
                assert got is not None and got.lease == b.lease
                theirs = replica("app-web-1-r1", 1, "10.89.2.2")
                await etcd.put(
                    (KEYS["replicas"] + "a/app-web-1-r1").encode(),
                    encode(theirs).encode(),
                )
                await until(lambda: len(placement.remote_replicas("app")) == 1, 5, "theirs")
                assert placement.remote_replicas("app")[0].address == "10.89.2.2"
                await placement.publish([])
                assert await etcd.get((KEYS["replicas"] + "b/app-web-4-r1").encode()) is None
        finally:
            await placement.stop()
            await b.stop()

    asyncio.run(scenario())


def test_placements_written_between_the_read_and_the_watch_are_not_missed(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    """The leader writes a node's first placements after the node read that it has
    none and before its watch is made (here: each time a watch is made): the node
    runs them all the same, not once a later write or a broken watch comes."""

    async def scenario() -> None:
        b = Membership(record("b"), etcd1.endpoints)
        await b.start()
        key = (KEYS["assignments"] + "b").encode()
        written: list[int] = []
        make_watch = b._client.watch

        async def watch_after_a_write(watched: bytes, **options: Any) -> Any:
            if watched == key and not written:
                written.append(1)
                await b._client.put(key, encode(placed("b", 5, 2, 4)).encode())
            return await make_watch(watched, **options)

        b._client.watch = watch_after_a_write
        placement = ClusterPlacement(b._client, b, list, lambda: None, lambda *_: None)
        placement.start()
        try:
            await until(lambda: placement.instances("app", "web") == [2, 4], 5, "gen 5")
        finally:
            await placement.stop()
            await b.stop()

    asyncio.run(scenario())


def replica(
    rid: str, instance: int, address: str, service: str = "web", **extra: Any
) -> ReplicaInfo:
    return ReplicaInfo(
        id=rid,
        deployment="app",
        service=service,
        instance=instance,
        revision=1,
        image="busybox",
        state="running",
        health="healthy",
        address=address,
        **extra,
    )


def test_instance_numbers_come_from_the_placed_names() -> None:
    assert instance_of("app-web-3") == 3
    assert instance_of("my-app-api-12") == 12


def test_a_block_is_claimed_by_one_node_and_published_in_its_record(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a"), etcd1.endpoints)
        b = Membership(record("b"), etcd1.endpoints)
        await a.start()
        await b.start()
        made: list[ClusterPlacement] = []

        async def block_a() -> str:
            return "10.90.1.0/24"

        try:
            from daemons.schedd.cluster_placement import claim_subnet

            async with client(etcd1.endpoints, timeout=5) as etcd:
                assert await claim_subnet(etcd, "b", "10.90.2.0/24")
                assert await claim_subnet(etcd, "b", "10.90.2.0/24")  # its own again
                assert not await claim_subnet(etcd, "a", "10.90.2.0/24")  # b's
            placement = ClusterPlacement(
                a._client, a, list, lambda: None, lambda *_: None, subnet=block_a
            )
            made.append(placement)
            placement.start()
            # a's record carries its block; b sees it as a peer to route via a's address.
            await until(lambda: b.nodes.get("a", a.record).subnet == "10.90.1.0/24", 10, "a's")
            other = ClusterPlacement(b._client, b, list, lambda: None, lambda *_: None)
            peers = other.peers()
            assert [(p.node, p.subnet, p.address) for p in peers] == [
                ("a", "10.90.1.0/24", "127.0.0.1")
            ]
        finally:
            for item in made:
                await item.stop()
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_a_node_stops_what_it_no_longer_owns_before_it_starts_anything() -> None:
    from daemons.schedd.views import owned_first
    from shared.wire.agent import ServiceAssignment

    def assigned(service: str, *instances: int) -> ServiceAssignment:
        return ServiceAssignment(
            deployment="app",
            service=service,
            revision=1,
            spec={},
            replicas=4,
            instances=list(instances),
        )

    # It runs web 1 and 2 and api 1; it now owns web 2 and 3, and api 4.
    running = [
        replica("app-web-1-r1", 1, "10.90.1.2"),
        replica("app-web-2-r1", 2, "10.90.1.3"),
        replica("app-api-1-r1", 1, "10.90.1.4", service="api"),
    ]
    desired = {("app", "web"): assigned("web", 2, 3), ("app", "api"): assigned("api", 4)}
    first = owned_first(running, desired)
    # First only what it runs and still owns: web 2; api and web 3 wait.
    assert {k: a.instances for k, a in first.items()} == {("app", "web"): [2]}
    # Once web 1 and api 1 are gone, the whole view.
    assert owned_first(running[1:2], desired) == desired
    assert owned_first([], desired) == desired
