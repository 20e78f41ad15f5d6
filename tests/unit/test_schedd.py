"""schedd's store and decisions: revisions, holds, events, order, replica counts, cron,
and its copy of agentd's replicas."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import cast

import pytest

from daemons.agentd.replicas import RestartDecision
from daemons.schedd import replicas as replicas_module
from daemons.schedd.replicas import ReplicaCache
from daemons.schedd.scheduler import condition_met, next_cron_time
from daemons.schedd.status import desired_replicas, start_order
from daemons.schedd.store import Store
from shared.clients import AgentClient
from shared.spec import ServiceSpec, parse_spec
from shared.wire.agent import HealthState, JobRun, ReplicaInfo, ReplicaState, ReplicaType
from shared.wire.daemon import DaemonStatus
from shared.wire.scheduler import Event

SPEC = """
version: v1
deployment: shop
services:
  web:
    image: zlayer/busybox
    depends: [{service: api}]
    scale: {mode: fixed, replicas: 3}
  api:
    image: zlayer/busybox
    depends: [{service: db, condition: started}]
  db:
    image: zlayer/busybox
    scale: {mode: manual}
  migrate:
    rtype: job
    image: zlayer/busybox
"""


def test_start_order_puts_dependencies_first() -> None:
    order = start_order(parse_spec(SPEC, "t.yml"))
    assert order.index("db") < order.index("api") < order.index("web")
    assert sorted(order) == ["api", "db", "migrate", "web"]


def test_desired_replicas_by_mode_and_hold() -> None:
    spec = parse_spec(SPEC, "t.yml")
    assert desired_replicas(spec.services["web"], None) == 3
    assert desired_replicas(spec.services["web"], 5) == 5
    assert desired_replicas(spec.services["db"], None) == 1
    assert desired_replicas(spec.services["api"], None) == 1  # adaptive: min
    assert desired_replicas(spec.services["migrate"], None) == 0


def replica(state: ReplicaState, health: HealthState) -> ReplicaInfo:
    return ReplicaInfo(
        id="x",
        deployment="d",
        service="s",
        instance=1,
        revision=1,
        image="i",
        state=state,
        health=health,
    )


def test_conditions() -> None:
    assert not condition_met("started", [], [])
    assert condition_met("started", [replica("running", "starting")], [])
    assert not condition_met("healthy", [replica("running", "starting")], [])
    assert condition_met("healthy", [replica("running", "healthy")], [])
    assert condition_met("ready", [replica("running", "none")], [])
    ok = JobRun(
        id="r",
        deployment="d",
        service="s",
        trigger="deploy",
        state="succeeded",
        exit_code=0,
        started_at=0,
    )
    assert condition_met("healthy", [], [ok])


@pytest.mark.parametrize(
    ("schedule", "after", "expected"),
    [
        ("*/5 * * * *", "2026-01-01 00:01:00", "2026-01-01 00:05:00"),
        ("30 */5 * * * *", "2026-01-01 00:01:00", "2026-01-01 00:05:30"),
        ("0 0 3 * * * *", "2026-01-01 00:00:00", "2026-01-01 03:00:00"),
    ],
)
def test_next_cron_time_all_forms(schedule: str, after: str, expected: str) -> None:
    start = datetime.fromisoformat(after).timestamp()
    assert next_cron_time(schedule, start) == datetime.fromisoformat(expected).timestamp()


def test_store_revisions_holds_and_events(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.add_revision("shop", "{}", "text1", "a.yml") == 1
    store.hold_scale("shop", "web", 4)
    store.set_stopped("shop", "db", True)
    assert store.scale_holds("shop") == {"web": 4}
    assert store.add_revision("shop", '{"x": 1}', "text2", "a.yml") == 2
    assert store.scale_holds("shop") == {}  # a deploy ends every hold
    assert store.stopped_services("shop") == set()
    stored = store.get("shop")
    assert stored is not None and stored.revision == 2 and stored.spec_text == "text2"
    store.add_events([Event(time=time.time(), deployment="shop", kind="deploy", message="hi")])
    assert [e.message for e in store.events("shop")] == ["hi"]
    store.close()
    reopened = Store(tmp_path / "state.db")
    assert reopened.names() == ["shop"]
    reopened.remove("shop")
    assert reopened.get("shop") is None and reopened.events("shop") == []
    reopened.close()


def test_restart_decisions() -> None:
    def svc(**fields: object) -> ServiceSpec:
        return ServiceSpec.model_validate({"image": "i", **fields})

    default = svc()
    assert RestartDecision.should_restart(default, 0, 0, False)
    assert not RestartDecision.should_restart(
        svc(errors={"on_panic": {"action": "shutdown"}}), 1, 0, False
    )
    on_failure = svc(restart_policy={"kind": "on_failure", "max_attempts": 2})
    assert not RestartDecision.should_restart(on_failure, 0, 0, False)
    assert RestartDecision.should_restart(on_failure, 3, 1, False)
    assert not RestartDecision.should_restart(on_failure, 3, 2, False)
    assert not RestartDecision.should_restart(svc(rtype="job"), 1, 0, False)
    assert [RestartDecision.delay(default, n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert RestartDecision.delay(default, 30) == 60.0


def test_a_removal_and_the_generation_survive_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.add_revision("shop", "{}", "text", "a.yml")
    assert store.generation() == 0
    assert store.next_generation() == 1
    assert store.next_generation(at_least=41) == 42  # past a holder's newer view
    store.set_removing("shop")
    store.close()
    reopened = Store(tmp_path / "state.db")
    stored = reopened.get("shop")
    assert stored is not None and stored.removing
    assert reopened.generation() == 42 and reopened.next_generation() == 43
    # A deploy of the same name while it is being removed takes it back.
    reopened.add_revision("shop", "{}", "text2", "a.yml")
    again = reopened.get("shop")
    assert again is not None and not again.removing and again.revision == 2
    reopened.close()


def test_a_revision_and_its_service_states_are_stored_together(tmp_path: Path) -> None:
    from daemons.schedd.store import ServiceState

    store = Store(tmp_path / "state.db")
    store.add_revision(
        "shop", "{}", "t", "a.yml", {"web": ServiceState(1, 1), "db": ServiceState(1, 1)}
    )
    store.add_revision("shop", "{}", "t", "a.yml", {"web": ServiceState(1, 2, rollout="running")})
    states = store.service_states("shop")
    assert set(states) == {"web"}  # db left the spec with revision 2
    assert states["web"].target == 2 and states["web"].rollout == "running"
    store.close()


def test_a_store_from_before_removals_were_kept_opens(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE deployments (name TEXT PRIMARY KEY, revision INTEGER NOT NULL, "
        "stopped INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    old.execute("INSERT INTO deployments VALUES ('shop', 1, 0, 0, 0)")
    old.commit()
    old.close()
    store = Store(path)
    store.add_revision("shop", "{}", "t", "a.yml")
    stored = store.get("shop")
    assert stored is not None and not stored.removing
    store.close()


class FakeAgent:
    """agentd as the replica cache sees it: Status, ListReplicas and ReplicaChanged."""

    def __init__(self, replicas: list[ReplicaInfo]) -> None:
        self.listed = list(replicas)
        self.pid = 100
        self.lists = 0
        self.signals: asyncio.Queue[ReplicaInfo | Exception] = asyncio.Queue()
        self.during_list: list[ReplicaInfo] = []  # signals taken while a list is on its way

    async def status(self) -> DaemonStatus:
        return DaemonStatus(
            name="agentd",
            state="running",
            version="0",
            pid=self.pid,
            started_at_usec=self.pid,
            metrics_url="",
            supervisor="none",
        )

    async def list_replicas(self, deployment: str = "", service: str = "") -> list[ReplicaInfo]:
        self.lists += 1
        for info in self.during_list:
            self.signals.put_nowait(info)
        self.during_list = []
        await asyncio.sleep(0.01)  # the signals arrive before the reply is read
        return list(self.listed)

    async def replica_changes(self) -> AsyncIterator[ReplicaInfo]:
        while True:
            item = await self.signals.get()
            if isinstance(item, Exception):
                raise item
            yield item


def info(
    rid: str, state: ReplicaState = "running", rtype: ReplicaType = "service", dep: str = "d"
) -> ReplicaInfo:
    return ReplicaInfo(
        id=rid,
        deployment=dep,
        service="s",
        instance=int(rid[-1]),
        revision=1,
        rtype=rtype,
        image="i",
        state=state,
    )


def run_with_cache(
    agent: FakeAgent, body: Callable[[ReplicaCache, list[int]], Awaitable[None]]
) -> list[int]:
    """Run ``body`` with a cache of ``agent`` watching its signals; the wake-ups counted."""
    wakes: list[int] = []

    async def main() -> None:
        cache = ReplicaCache(cast(AgentClient, agent), lambda: wakes.append(1))
        watch = asyncio.create_task(cache.watch())
        await asyncio.sleep(0)  # subscribed before the first read, as in schedd
        try:
            await body(cache, wakes)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    asyncio.run(main())
    return wakes


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_replica_cache_lists_once_then_follows_the_signals() -> None:
    agent = FakeAgent([info("r1"), info("r2"), info("o1", dep="other")])

    async def body(cache: ReplicaCache, wakes: list[int]) -> None:
        assert [r.id for r in await cache.replicas()] == ["r1", "r2", "o1"]  # agentd's order
        assert [r.id for r in await cache.replicas("d")] == ["r1", "r2"]
        agent.signals.put_nowait(info("r2", state="stopping"))
        agent.signals.put_nowait(info("r1", state="stopped"))  # removed
        agent.signals.put_nowait(info("r3", state="creating"))
        agent.signals.put_nowait(info("j1", rtype="job"))
        await settle()
        assert [(r.id, r.state) for r in await cache.replicas("d")] == [
            ("j1", "running"),
            ("r2", "stopping"),
            ("r3", "creating"),
        ]
        agent.signals.put_nowait(info("j1", state="exited", rtype="job"))  # a finished run goes
        await settle()
        assert [r.id for r in await cache.replicas("d")] == ["r2", "r3"]
        assert len(wakes) == 5
        assert agent.lists == 1

    run_with_cache(agent, body)


def test_the_replica_cache_lists_again_when_agentd_restarts_or_the_signals_break(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replicas_module, "CHECK_INTERVAL", 0.0)
    monkeypatch.setattr(replicas_module, "RESUBSCRIBE_DELAY", 0.0)
    agent = FakeAgent([info("r1")])

    async def body(cache: ReplicaCache, _wakes: list[int]) -> None:
        await cache.replicas()
        await cache.replicas()
        assert agent.lists == 1
        agent.pid = 200  # another agentd, which lost r1 while it was down
        agent.listed = [info("r2")]
        assert [r.id for r in await cache.replicas()] == ["r2"]
        assert agent.lists == 2
        agent.listed = [info("r3")]
        agent.signals.put_nowait(ConnectionError("the bus went away"))
        await settle()
        assert [r.id for r in await cache.replicas()] == ["r3"]
        assert agent.lists == 3
        cache.invalidate("resync")
        await cache.replicas()
        assert agent.lists == 4

    run_with_cache(agent, body)


def test_a_signal_taken_while_the_list_is_on_its_way_wins_over_the_list() -> None:
    agent = FakeAgent([info("r1"), info("r2")])
    agent.during_list = [info("r1", state="stopped"), info("r2", state="stopping")]

    async def body(cache: ReplicaCache, _wakes: list[int]) -> None:
        assert [(r.id, r.state) for r in await cache.replicas()] == [("r2", "stopping")]

    run_with_cache(agent, body)


def test_the_replica_cache_knows_when_a_replica_last_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replicas_module, "REFETCH_INTERVAL", 0.0)  # a full list at every read
    agent = FakeAgent([info("r1", state="failed")])

    async def body(cache: ReplicaCache, _wakes: list[int]) -> None:
        await cache.replicas()
        first = cache.since("r1")
        await asyncio.sleep(0.01)
        await cache.replicas()
        assert cache.since("r1") == first  # listed again, unchanged
        agent.signals.put_nowait(info("r1", state="creating"))
        await settle()
        assert cache.since("r1") > first

    run_with_cache(agent, body)
