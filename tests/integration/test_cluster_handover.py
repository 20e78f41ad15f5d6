"""Draining and fencing on real etcd: a draining node keeps each replica until its new
copy serves elsewhere, a replica moved off a node is unpublished before it stops, and a
node cut off from etcd for longer than its lease knows it is fenced."""

from __future__ import annotations

import asyncio

from daemons.schedd.cluster_placement import (
    LEAVE_DRAIN,
    ClusterPlacement,
    Handover,
    current_placements,
    placement_pass,
)
from daemons.schedd.membership import Membership
from shared.wire import encode, replace
from shared.wire.agent import ReplicaInfo
from shared.wire.cluster import KEYS, NodePlacements, NodeRoutes, Placement
from tests.etcd_fixture import EtcdCluster, etcd1  # noqa: F401  (a fixture)
from tests.integration.test_cluster_placement import web
from tests.integration.test_membership import record, until


def copy_of(node: str, instance: int, health: str = "healthy") -> ReplicaInfo:
    """Replica ``instance`` of app/web as ``node`` publishes it."""
    return ReplicaInfo(
        id=f"app-web-{instance}-r1",
        deployment="app",
        service="web",
        instance=instance,
        revision=1,
        image="busybox",
        state="running",
        health=health,  # type: ignore[arg-type]
        address=f"10.90.{ord(node[0]) - 96}.{instance + 1}",
        node=node,
    )


def where(docs: dict[str, NodePlacements]) -> dict[str, list[str]]:
    return {node: sorted(p.replica for p in doc.replicas) for node, doc in docs.items()}


def test_a_draining_node_keeps_its_replica_until_the_new_copy_serves(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a"), etcd1.endpoints)
        await a.start()
        b = Membership(record("b"), etcd1.endpoints)
        try:
            await until(lambda: a.is_leader, 10, "a leads")
            etcd = a._client
            handover = Handover(settle=0.3)

            async def place() -> int | None:
                _, generation = await placement_pass(
                    etcd, "a", a.lease, a.live(), [web(1)], handover
                )
                return generation

            assert await place() == 1
            assert where(await current_placements(etcd)) == {"a": ["app-web-1"]}

            await b.start()
            await a.update(replace(a.record, state="draining"))
            await until(lambda: set(a.live()) == {"a", "b"}, 10, "a sees b")
            await until(lambda: a.live()["a"].state == "draining", 10, "a is draining")
            # Placed on b, and kept on a while b's copy does not serve.
            assert await place() == 2
            assert where(await current_placements(etcd)) == {
                "a": ["app-web-1"],
                "b": ["app-web-1"],
            }
            assert handover.holding == 1
            await etcd.put(
                f"{KEYS['replicas']}b/app-web-1-r1".encode(),
                encode(copy_of("b", 1, "starting")).encode(),
            )
            assert await place() is None  # starting: not in rotation yet
            await etcd.put(
                f"{KEYS['replicas']}b/app-web-1-r1".encode(), encode(copy_of("b", 1)).encode()
            )
            assert await place() is None  # in rotation, not yet for the settle time
            # Both nodes' proxyd route the old copy; b's does not yet route the new one.
            old_address, new_address = copy_of("a", 1).address, copy_of("b", 1).address
            for node, addresses in (("a", [old_address, new_address]), ("b", [old_address])):
                routes = NodeRoutes(node=node, routes={"app/web": addresses})
                await etcd.put(f"{KEYS['routed']}{node}".encode(), encode(routes).encode())
            await asyncio.sleep(0.4)
            assert await place() is None  # served for the settle time, not routed everywhere
            routes = NodeRoutes(node="b", routes={"app/web": [old_address, new_address]})
            await etcd.put(f"{KEYS['routed']}b".encode(), encode(routes).encode())
            # It has served for the settle time and every proxyd routes it: a lets it go.
            assert await place() == 3
            assert where(await current_placements(etcd)) == {"a": [], "b": ["app-web-1"]}
            assert handover.holding == 0
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(scenario())


def test_a_replica_that_fits_nowhere_else_stays_on_the_draining_node(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a"), etcd1.endpoints)
        await a.start()
        try:
            await until(lambda: a.is_leader, 10, "a leads")
            handover = Handover()
            await placement_pass(a._client, "a", a.lease, a.live(), [web(1)], handover)
            await a.update(replace(a.record, state="draining"))
            await until(lambda: a.live()["a"].state == "draining", 10, "a is draining")
            plan, _ = await placement_pass(a._client, "a", a.lease, a.live(), [web(1)], handover)
            assert [p.reason for p in plan.pending] == [
                "no node is ready (the cluster's nodes are draining)"
            ]
            assert where(await current_placements(a._client)) == {"a": ["app-web-1"]}
            # Scaled to nothing, it goes.
            await placement_pass(a._client, "a", a.lease, a.live(), [web(0)], handover)
            assert where(await current_placements(a._client)) == {"a": []}
        finally:
            await a.stop()

    asyncio.run(scenario())


def test_a_replica_moved_off_a_node_is_unpublished_first_and_stops_after_its_drain(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a"), etcd1.endpoints)
        await a.start()
        try:
            changes: list[int] = []
            placement = ClusterPlacement(
                a._client, a, list, lambda: changes.append(1), lambda *_: None
            )
            one = Placement(deployment="app", service="web", replica="app-web-1", revision=1)
            two = Placement(deployment="app", service="web", replica="app-web-2", revision=1)
            placement.take(NodePlacements(node="a", generation=1, replicas=[one, two]))
            mine = [copy_of("a", 1), copy_of("a", 2)]
            await placement.publish(mine)
            prefix = f"{KEYS['replicas']}a/".encode()
            published = {kv.key.decode() for kv in await a._client.get_prefix(prefix)}
            assert published == {f"{KEYS['replicas']}a/app-web-{i}-r1" for i in (1, 2)}

            # Another node serves instance 1 now; instance 2 is scaled away.
            placement.remote = {f"{KEYS['replicas']}b/app-web-1-r1": copy_of("b", 1)}
            placement.take(NodePlacements(node="a", generation=2, replicas=[]))
            assert placement.instances("app", "web") == [1]  # it drains, still running
            await placement.publish(mine)
            published = {kv.key.decode() for kv in await a._client.get_prefix(prefix)}
            # the moved one is unpublished at once; the one scaled away stays until gone
            assert published == {f"{KEYS['replicas']}a/app-web-2-r1"}
            count = len(changes)
            await asyncio.sleep(LEAVE_DRAIN + 0.2)
            assert placement.instances("app", "web") == []
            assert len(changes) > count  # a reconcile pass was woken to stop it
            # While agentd still lists it (stopping), it stays unpublished; once gone,
            # nothing of it is kept.
            await placement.publish(mine)
            published = {kv.key.decode() for kv in await a._client.get_prefix(prefix)}
            assert published == {f"{KEYS['replicas']}a/app-web-2-r1"}
            await placement.publish([copy_of("a", 2)])
            assert placement.leaving == {}
        finally:
            await a.stop()

    asyncio.run(scenario())


def test_a_node_cut_off_for_longer_than_its_lease_is_fenced_until_it_registers_again(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def scenario() -> None:
        a = Membership(record("a"), etcd1.endpoints, ttl=2)
        await a.start()
        try:
            await until(lambda: a.is_leader, 10, "a leads")
            assert not a.fenced
            etcd1.kill(0)
            took = await until(lambda: a.fenced, 6, "a is fenced")
            assert took <= 2.5, took
            assert a.lease is None and not a.is_leader
            await asyncio.to_thread(etcd1.restart, 0)
            await until(lambda: not a.fenced and a.lease is not None, 20, "a registers again")
        finally:
            await a.stop()

    asyncio.run(scenario())
