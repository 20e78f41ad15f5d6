"""schedd's store and decisions: revisions, holds, events, order, replica counts, cron."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from daemons.agentd.replicas import RestartDecision
from daemons.schedd.scheduler import condition_met, desired_replicas, next_cron_time, start_order
from daemons.schedd.store import Store
from shared.spec import ServiceSpec, parse_spec
from shared.wire.agent import JobRun, ReplicaInfo
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


def replica(state: str, health: str) -> ReplicaInfo:
    return ReplicaInfo(
        id="x",
        deployment="d",
        service="s",
        instance=1,
        revision=1,
        image="i",
        state=state,
        health=health,  # type: ignore[arg-type]
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
    store.add_event(Event(time=time.time(), deployment="shop", kind="deploy", message="hi"))
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
