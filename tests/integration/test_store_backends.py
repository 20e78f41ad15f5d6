"""schedd's two store backends, one suite: SQLite in a file and etcd (real members).

Every test runs against both: the same calls give the same answers, a
multi-key change is seen whole or not at all, two stores sharing the state
never hand out the same generation, events stay bounded, and a secret's
plain value is nowhere in what is stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemons.schedd.etcdstore import (
    EtcdStore,
    MoveRefusedError,
    StoreUnavailableError,
    _revision_doc,
    move_to_etcd,
)
from daemons.schedd.secrets import Secrets
from daemons.schedd.store import DesiredStore, ServiceState, Store, StoreClosedError
from shared.bus import open_bus
from shared.busdaemon import PrivateBus
from shared.clients import SchedulerClient
from shared.cluster.etcd import TLSFiles, client
from shared.paths import Paths
from shared.wire.cluster import KEYS
from shared.wire.scheduler import Event
from tests.daemon_process import daemon_process
from tests.etcd_fixture import EtcdCluster, etcd_cluster
from tests.registry_fixture import free_port


@pytest.fixture(scope="module")
def etcd_once() -> Iterator[EtcdCluster]:
    """One member for the module; each test has a key prefix of its own."""
    with etcd_cluster(1) as cluster:
        yield cluster


@dataclass
class Backend:
    kind: str
    make: Callable[[], DesiredStore]
    # Every stored byte: the database files, or every key and value under the prefix.
    raw: Callable[[], bytes]
    # (deployment record's spec_json, {service: message}) read at one point in time.
    snapshot: Callable[[str], tuple[str, dict[str, str]]]
    opened: list[DesiredStore] = field(default_factory=list)

    def store(self) -> DesiredStore:
        store = self.make()
        self.opened.append(store)
        return store


def _sqlite_backend(path: Path) -> Backend:
    def raw() -> bytes:
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))

    def snapshot(name: str) -> tuple[str, dict[str, str]]:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("BEGIN")
            row = db.execute(
                "SELECT r.spec_json FROM deployments d JOIN revisions r "
                "ON r.deployment = d.name AND r.revision = d.revision WHERE d.name = ?",
                (name,),
            ).fetchone()
            states = db.execute(
                "SELECT service, message FROM services WHERE deployment = ?", (name,)
            ).fetchall()
            db.execute("COMMIT")
        finally:
            db.close()
        return (row[0] if row else "", dict(states))

    return Backend("sqlite", lambda: Store(path), raw, snapshot)


def _etcd_backend(cluster: EtcdCluster) -> Backend:
    prefix = f"/zlayer-test/{uuid.uuid4().hex}/state/"

    async def dump() -> bytes:
        async with client(cluster.endpoints, timeout=10) as c:
            found = await c.get_prefix(prefix.encode())
            return b"".join(kv.key + b"\0" + kv.value + b"\0" for kv in found)

    def snapshot(name: str) -> tuple[str, dict[str, str]]:
        async def read() -> tuple[str, dict[str, str]]:
            async with client(cluster.endpoints, timeout=10) as c:
                # One transaction of gets: one revision of the store.
                p = prefix.encode()
                services = p + f"services/{name}/".encode()
                _, (deps, revs, states) = await c.transaction(
                    compare=[],
                    success=[
                        c.transactions.get(p + f"deployments/{name}".encode()),
                        c.transactions.get(
                            p + f"revisions/{name}/".encode(), p + f"revisions/{name}0".encode()
                        ),
                        c.transactions.get(services, services[:-1] + b"0"),
                    ],
                    failure=[],
                )
            if not deps:
                return "", {}
            revision = json.loads(deps[0][0])["revision"]
            spec = {
                int(meta.key.rsplit(b"/", 1)[1]): _revision_doc(value)["spec_json"]
                for value, meta in revs
            }[revision]
            return spec, {
                meta.key.rsplit(b"/", 1)[1].decode(): json.loads(value)["message"]
                for value, meta in states
            }

        return asyncio.run(read())

    return Backend(
        "etcd",
        lambda: EtcdStore(cluster.endpoints, prefix=prefix),
        lambda: asyncio.run(dump()),
        snapshot,
    )


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        made = _sqlite_backend(tmp_path / "state.db")
    else:
        made = _etcd_backend(request.getfixturevalue("etcd_once"))
    yield made
    for store in made.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> DesiredStore:
    return backend.store()


def state(n: int, message: str = "") -> ServiceState:
    return ServiceState(serving=n, target=n, message=message)


def test_deployments_and_revisions_round_trip(store: DesiredStore) -> None:
    assert store.get("app") is None and store.names() == [] and store.next_revision("app") == 1
    assert store.add_revision("app", '{"v": 1}', "v: 1\n", "app.yml") == 1
    first = store.get("app")
    assert first is not None
    assert (first.name, first.revision, first.stopped, first.removing) == ("app", 1, False, False)
    assert (first.spec_json, first.spec_text) == ('{"v": 1}', "v: 1\n")
    assert store.add_revision("app", '{"v": 2}', "v: 2\n", "other.yml") == 2
    second = store.get("app")
    assert second is not None and second.revision == 2 and second.spec_json == '{"v": 2}'
    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    assert store.revisions("app") == [1, 2] and store.next_revision("app") == 3
    assert store.revision_spec("app", 1) == '{"v": 1}'
    assert store.revision_source("app", 2) == ("v: 2\n", "other.yml")
    assert store.revision_spec("app", 9) is None and store.revision_source("app", 9) is None
    # A name that is a prefix of another, and one with characters keys treat specially.
    store.add_revision("app2", "{}", "", "a.yml")
    store.add_revision("odd/name%", "{}", "", "a.yml")
    assert store.names() == ["app", "app2", "odd/name%"]
    assert store.revisions("app") == [1, 2] and store.revisions("odd/name%") == [1]


def test_a_deploy_that_ends_a_removal_starts_the_history_a_rollback_sees_again(
    store: DesiredStore,
) -> None:
    """``down`` and then ``up`` before the replicas were gone: the deployment is deployed
    anew, so a rollback finds nothing from before the ``down``, as after a removal that
    ended; the revision numbers go on (replicas of the old ones may still run)."""
    store.add_revision("app", '{"v": 1}', "", "a.yml")
    store.add_revision("app", '{"v": 2}', "", "a.yml")
    store.set_removing("app")
    assert store.add_revision("app", '{"v": 3}', "", "a.yml") == 3
    stored = store.get("app")
    assert stored is not None and not stored.removing
    assert store.revisions("app") == [3]
    assert store.revision_spec("app", 2) == '{"v": 2}'  # kept while its replicas may run
    store.add_revision("app", '{"v": 4}', "", "a.yml")
    assert store.revisions("app") == [3, 4]


def test_a_new_revision_clears_holds_and_stops_and_replaces_service_states(
    store: DesiredStore,
) -> None:
    store.add_revision("app", "{}", "", "a.yml", {"web": state(1), "db": state(1)})
    store.hold_scale("app", "web", 3)
    store.set_stopped("app", "db", True)
    store.set_stopped("app", "", True)
    store.set_removing("app")
    got = store.get("app")
    assert got is not None and got.stopped and got.removing
    assert store.scale_holds("app") == {"web": 3} and store.stopped_services("app") == {"db"}
    store.add_revision("app", "{}", "", "a.yml", {"web": state(2, "rolling")})
    got = store.get("app")
    assert got is not None and not got.stopped and not got.removing
    assert store.scale_holds("app") == {} and store.stopped_services("app") == set()
    assert store.service_states("app") == {"web": state(2, "rolling")}
    # Without states, the services' states stay.
    store.add_revision("app", "{}", "", "a.yml")
    assert store.service_states("app") == {"web": state(2, "rolling")}


def test_stops_holds_cron_and_service_states_round_trip(store: DesiredStore) -> None:
    store.add_revision("app", "{}", "", "a.yml")
    store.set_stopped("app", "web", True)
    store.set_stopped("app", "api", True)
    store.set_stopped("app", "api", False)
    assert store.stopped_services("app") == {"web"}
    store.set_stopped("app", "", True)
    got = store.get("app")
    assert got is not None and got.stopped
    store.set_stopped("app", "", False)
    got = store.get("app")
    assert got is not None and not got.stopped
    store.set_stopped("ghost", "", True)  # no such deployment: nothing happens
    assert store.get("ghost") is None

    store.hold_scale("app", "web", 4)
    store.hold_scale("app", "web", 2)
    store.hold_scale("app", "api", 0)
    assert store.scale_holds("app") == {"web": 2, "api": 0}

    full = ServiceState(
        serving=1,
        target=2,
        rollout="running",
        message="2 of 3 new",
        new_count=2,
        old_count=1,
        step_at=1234.5,
        adaptive=7,
        scaled_at=99.25,
        secrets="abc",
    )
    store.put_service_state("app", "web", full)
    store.put_service_state("app", "api", state(1))
    store.put_service_state("app", "api", state(3))
    assert store.service_states("app") == {"web": full, "api": state(3)}

    assert store.last_cron_run("app", "job") is None
    store.record_cron_run("app", "job", 1700000000.125)
    assert store.last_cron_run("app", "job") == 1700000000.125
    store.set_cron_enabled("app", "job", False)
    store.set_cron_enabled("app", "other", False)
    store.set_cron_enabled("app", "other", True)
    assert store.cron_disabled("app") == {"job"}


def test_remove_forgets_a_deployment_but_not_its_secrets(store: DesiredStore) -> None:
    for name in ("app", "app2"):
        store.add_revision(name, "{}", "", "a.yml", {"web": state(1)})
        store.hold_scale(name, "web", 2)
        store.set_stopped(name, "web", True)
        store.record_cron_run(name, "job", 5.0)
        store.set_cron_enabled(name, "job", False)
        store.add_events([Event(time=1.0, deployment=name, kind="deploy", message="hi")])
    store.put_secret("token", "app", b"n" * 12, b"sealed")
    store.remove("app")
    assert store.names() == ["app2"] and store.get("app") is None
    assert store.revisions("app") == [] and store.service_states("app") == {}
    assert store.scale_holds("app") == {} and store.stopped_services("app") == set()
    assert store.last_cron_run("app", "job") is None and store.cron_disabled("app") == set()
    assert store.events("app") == []
    assert store.next_revision("app") == 1
    assert store.secret("token", "app") is not None
    # The other deployment, whose name starts the same, is untouched.
    assert store.revisions("app2") == [1] and store.scale_holds("app2") == {"web": 2}
    assert len(store.events("app2")) == 1


def test_secrets_round_trip_with_versions(store: DesiredStore) -> None:
    assert store.secret("token", "") is None and store.secrets() == []
    first = store.put_secret("token", "", b"1" * 12, b"sealed-1")
    assert (first.version, first.nonce, first.ciphertext) == (1, b"1" * 12, b"sealed-1")
    second = store.put_secret("token", "", b"2" * 12, b"sealed-2")
    assert second.version == 2 and second.created_at == first.created_at
    assert store.secret("token", "") == second
    store.put_secret("token", "app", b"3" * 12, b"sealed-3")
    store.put_secret("a-key", "app", b"4" * 12, b"sealed-4")
    assert [(s.deployment, s.name) for s in store.secrets()] == [
        ("", "token"),
        ("app", "a-key"),
        ("app", "token"),
    ]
    assert store.remove_secret("token", "app") is True
    assert store.remove_secret("token", "app") is False
    assert store.secret("token", "app") is None and store.secret("token", "") == second


def test_events_keep_order_limit_and_bound(
    store: DesiredStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("daemons.schedd.store.EVENTS_KEPT", 5)
    monkeypatch.setattr("daemons.schedd.etcdstore.EVENTS_KEPT", 5)
    app = [
        Event(time=float(n), deployment="app", service="web", kind="k", message=f"m{n}")
        for n in range(12)
    ]
    other = Event(time=0.5, deployment="other", replica="r1", kind="k", message="x")
    store.add_events(app[:1])
    # schedd writes what was made since its last write in one call: two deployments
    # mixed, past the bound within the call
    store.add_events([*app[1:4], other, *app[4:11]])
    store.add_events(app[11:])
    store.add_events([])
    kept = store.events("app", 100)
    assert [e.message for e in kept] == [f"m{n}" for n in range(7, 12)]
    assert kept[-1] == Event(time=11.0, deployment="app", service="web", kind="k", message="m11")
    assert [e.message for e in store.events("app", 2)] == ["m10", "m11"]
    assert store.events("app", 0) == []
    assert store.events("other") == [
        Event(time=0.5, deployment="other", replica="r1", kind="k", message="x")
    ]


def test_more_events_in_one_call_than_one_transaction_takes_are_all_kept(
    store: DesiredStore,
) -> None:
    """etcd takes at most 128 operations in a transaction: a long write is split."""
    events = [Event(time=float(n), deployment="app", kind="k", message=f"m{n}") for n in range(250)]
    store.add_events(events)
    assert store.events("app", -1) == events


def test_generations_rise_and_follow_at_least(store: DesiredStore) -> None:
    assert store.generation() == 0
    assert store.next_generation() == 1
    assert store.next_generation(at_least=10) == 11
    assert store.next_generation(at_least=3) == 12
    assert store.generation() == 12


def test_two_stores_never_hand_out_the_same_generation(backend: Backend) -> None:
    stores = [backend.store(), backend.store()]
    got: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def take(index: int) -> None:
        try:
            for _ in range(40):
                got[index].append(stores[index].next_generation())
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    both = got[0] + got[1]
    assert sorted(both) == list(range(1, 81)), "a generation was handed out twice or lost"
    assert stores[0].generation() == 80


def test_one_store_called_from_several_threads_at_once(store: DesiredStore) -> None:
    """schedd runs calls in worker threads: they share one store."""
    got: list[int] = []
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for n in range(10):
                got.append(store.next_generation())
                store.put_service_state("app", f"s{index}", state(n))
                store.add_events([Event(time=float(n), deployment="app", kind="k", message="m")])
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert sorted(got) == list(range(1, 41))
    assert store.service_states("app") == {f"s{i}": state(9) for i in range(4)}
    assert len(store.events("app", 100)) == 40


def test_two_stores_adding_revisions_at_once_number_them_without_a_gap(
    backend: Backend,
) -> None:
    stores = [backend.store(), backend.store()]
    got: list[list[int]] = [[], []]

    def add(index: int) -> None:
        for _ in range(15):
            got[index].append(stores[index].add_revision("app", "{}", "", "a.yml"))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(got[0] + got[1]) == list(range(1, 31))
    assert stores[1].revisions("app") == list(range(1, 31))


def test_a_new_revision_and_its_service_states_are_seen_together_or_not_at_all(
    backend: Backend,
) -> None:
    """A reader at any moment sees a revision with its own services' states:
    never the new spec with the old states, nor a mix of two writes' services."""
    writer = backend.store()
    writer.add_revision("app", '"w0"', "", "a.yml", {"a": state(1, "w0"), "b": state(1, "w0")})
    done = threading.Event()
    seen: list[tuple[str, dict[str, str]]] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not done.is_set():
                seen.append(backend.snapshot("app"))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 40):
            mark = f"w{n}"
            # Odd writes name other services than even ones: a mix would show both.
            names = ("a", "b") if n % 2 == 0 else ("c",)
            writer.add_revision("app", f'"{mark}"', "", "a.yml", {s: state(n, mark) for s in names})
    finally:
        done.set()
        reader.join(60)
    assert not errors and len(seen) > 5
    for spec, messages in seen:
        mark = spec.strip('"')
        expected = {"a", "b"} if int(mark[1:]) % 2 == 0 else {"c"}
        assert messages == dict.fromkeys(expected, mark), (spec, messages)


def test_secrets_are_stored_sealed_never_plain(backend: Backend) -> None:
    store = backend.store()
    key = os.urandom(32)
    plain = "correct-horse-battery-staple-" + uuid.uuid4().hex
    Secrets(store, lambda: key).set("db-password", "app", plain)  # type: ignore[arg-type]
    Secrets(store, lambda: key).set("node-wide", "", plain)  # type: ignore[arg-type]
    stored = backend.raw()
    assert b"db-password" in stored  # the name is there: the dump is the right one
    for form in (plain.encode(), base64.b64encode(plain.encode()), plain.encode("utf-16-le")):
        assert form not in stored
    opened = Secrets(store, lambda: key)  # type: ignore[arg-type]
    found = store.secret("db-password", "app")
    assert found is not None and opened.open(found) == plain


def test_calls_after_close_say_the_store_is_closed(backend: Backend) -> None:
    store = backend.make()
    store.add_revision("app", "{}", "", "a.yml")
    store.close()
    for call in (
        lambda: store.names(),
        lambda: store.get("app"),
        lambda: store.add_revision("app", "{}", "", "a.yml"),
        lambda: store.next_generation(),
    ):
        with pytest.raises(StoreClosedError):
            call()


# ------------------------------------------------------------ etcd only


def test_an_unreachable_etcd_is_one_sentence_within_the_timeout() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = EtcdStore([endpoint], timeout=1.5)
    try:
        with pytest.raises(StoreUnavailableError) as raised:
            store.names()
        message = str(raised.value)
        assert message.startswith(f"the cluster's store (etcd at {endpoint}) does not answer")
        assert "\n" not in message
    finally:
        store.close()


def test_while_etcd_is_away_calls_fail_fast_and_work_again_once_it_is_back() -> None:
    """schedd makes some calls on its event loop: after one call found etcd away,
    the next ones give up within DOWN_TIMEOUT, not the whole timeout each."""
    import time

    from daemons.schedd.etcdstore import DOWN_TIMEOUT

    with etcd_cluster(1) as cluster:
        store = EtcdStore(cluster.endpoints, timeout=5)
        try:
            store.add_revision("app", "{}", "", "a.yml")
            cluster.kill(0)
            with pytest.raises(StoreUnavailableError):
                store.names()  # finds it away: up to the whole timeout
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="does not answer"):
                    store.get("app")
                assert time.monotonic() - started < DOWN_TIMEOUT + 2.5  # not the 5 s timeout
            cluster.restart(0)
            assert store.names() == ["app"]
            assert store.next_generation() == 1
        finally:
            store.close()


def test_the_store_keeps_working_when_a_member_of_three_is_killed() -> None:
    with etcd_cluster(3) as cluster:
        store = EtcdStore(cluster.endpoints)
        try:
            store.add_revision("app", "{}", "", "a.yml")
            generation = store.next_generation()
            cluster.kill(0)  # the one a client reaches first
            assert store.next_generation() == generation + 1
            assert store.add_revision("app", "{}", "", "a.yml") == 2
            assert store.names() == ["app"]
        finally:
            store.close()


def test_the_default_layout_is_under_the_clusters_state_key(etcd_once: EtcdCluster) -> None:
    store = EtcdStore(etcd_once.endpoints)
    try:
        store.add_revision("layout-check", "{}", "", "a.yml")

        async def keys() -> list[bytes]:
            async with client(etcd_once.endpoints, timeout=10) as c:
                found: Any = await c.get_prefix(KEYS["state"].encode(), keys_only=True)
                return [kv.key for kv in found]

        found = asyncio.run(keys())
        assert (KEYS["state"] + "deployments/layout-check").encode() in found
    finally:
        store.remove("layout-check")
        store.close()


# ------------------------------------------------------------ a lone node's state into etcd


def _filled_sqlite(path: Path, tag: str = "") -> Store:
    lone = Store(path)
    for name in (f"web{tag}", "odd/name%"):
        lone.add_revision(name, '{"v": 1}', "v: 1\n", "a.yml", {"web": state(1)})
        lone.add_revision(name, '{"v": 2}', "v: 2\n", "b.yml", {"web": state(2, "rolling")})
        lone.hold_scale(name, "web", 3)
        lone.set_stopped(name, "api", True)
        lone.record_cron_run(name, "job", 1700000000.5)
        lone.set_cron_enabled(name, "job", False)
        for n in range(3):
            lone.add_events(
                [Event(time=float(n), deployment=name, kind="k", message=f"{name} {n}")]
            )
    lone.set_stopped("odd/name%", "", True)
    lone.set_removing(f"web{tag}")
    lone.put_secret("token", "", b"1" * 12, b"sealed-node-wide")
    lone.put_secret("token", f"web{tag}", b"2" * 12, b"sealed-web")
    lone.next_generation(at_least=41)
    return lone


def _same_state(a: DesiredStore, b: DesiredStore) -> None:
    assert a.names() == b.names()
    for name in a.names():
        assert a.get(name) == b.get(name)
        assert a.revisions(name) == b.revisions(name)
        for revision in a.revisions(name):
            assert a.revision_spec(name, revision) == b.revision_spec(name, revision)
            assert a.revision_source(name, revision) == b.revision_source(name, revision)
        assert a.service_states(name) == b.service_states(name)
        assert a.scale_holds(name) == b.scale_holds(name)
        assert a.stopped_services(name) == b.stopped_services(name)
        assert a.cron_disabled(name) == b.cron_disabled(name)
        assert a.last_cron_run(name, "job") == b.last_cron_run(name, "job")
        assert a.events(name, -1) == b.events(name, -1)
    assert a.secrets() == b.secrets()
    assert a.generation() == b.generation()


@pytest.fixture
def etcd_store(etcd_once: EtcdCluster) -> Iterator[EtcdStore]:
    store = EtcdStore(etcd_once.endpoints, prefix=f"/zlayer-test/{uuid.uuid4().hex}/state/")
    yield store
    store.close()


def test_a_lone_nodes_state_moves_whole_and_a_second_move_changes_nothing(
    tmp_path: Path, etcd_store: EtcdStore
) -> None:
    lone = _filled_sqlite(tmp_path / "state.db")
    try:
        assert move_to_etcd(lone, etcd_store) > 20
        _same_state(lone, etcd_store)
        assert move_to_etcd(lone, etcd_store) == 0
        _same_state(lone, etcd_store)
        # The cluster goes on from the moved state: numbers continue, and a later
        # move of the same node (init run again) still changes nothing.
        assert etcd_store.add_revision("web", "{}", "", "c.yml") == 3
        assert etcd_store.next_generation() == 43
        assert len(etcd_store.events("web", -1)) == 3
        etcd_store.add_events([Event(time=9.0, deployment="web", kind="k", message="after")])
        assert [e.message for e in etcd_store.events("web", 2)] == ["web 2", "after"]
        assert move_to_etcd(lone, etcd_store) == 0
        # web was being removed: revision 3 deployed it anew, a rollback sees from there.
        assert etcd_store.revisions("web") == [3]
        assert etcd_store.revision_spec("web", 1) == '{"v": 1}'
    finally:
        lone.close()


def test_a_move_cut_short_goes_on_where_it_stopped(tmp_path: Path, etcd_store: EtcdStore) -> None:
    from daemons.schedd.etcdstore import _sqlite_state

    lone = _filled_sqlite(tmp_path / "state.db")
    try:
        every = sorted(_sqlite_state(lone).items())
        half = every[: len(every) // 2]

        async def put_half() -> None:
            async with client(etcd_store.endpoints, timeout=10) as c:
                for key, value in half:
                    await c.put(etcd_store.prefix + key.encode(), value)

        asyncio.run(put_half())
        assert move_to_etcd(lone, etcd_store) == len(every) - len(half)
        _same_state(lone, etcd_store)
    finally:
        lone.close()


def test_a_move_into_another_clusters_state_is_refused_and_changes_nothing(
    tmp_path: Path, etcd_store: EtcdStore
) -> None:
    first = _filled_sqlite(tmp_path / "first.db")
    other = _filled_sqlite(tmp_path / "other.db", tag="-other")
    try:
        move_to_etcd(first, etcd_store)
        with pytest.raises(MoveRefusedError) as raised:
            move_to_etcd(other, etcd_store)
        assert "already holds schedd state that is not this node's" in str(raised.value)
        _same_state(first, etcd_store)
    finally:
        first.close()
        other.close()


def test_a_move_into_state_a_cluster_wrote_itself_is_refused(
    tmp_path: Path, etcd_store: EtcdStore
) -> None:
    etcd_store.add_revision("theirs", "{}", "", "a.yml")
    lone = _filled_sqlite(tmp_path / "state.db")
    try:
        with pytest.raises(MoveRefusedError, match="keys differ"):
            move_to_etcd(lone, etcd_store)
        assert etcd_store.names() == ["theirs"]
    finally:
        lone.close()


def test_an_empty_lone_node_moves_into_an_empty_etcd(tmp_path: Path, etcd_store: EtcdStore) -> None:
    lone = Store(tmp_path / "state.db")
    try:
        assert move_to_etcd(lone, etcd_store) == 0
        assert etcd_store.names() == [] and etcd_store.generation() == 0
        assert move_to_etcd(lone, etcd_store) == 0
    finally:
        lone.close()


def test_a_cluster_section_with_tls_files_reaches_etcd_over_mutual_tls(tmp_path: Path) -> None:
    from daemons.schedd.backend import ClusterSettings, open_store

    with etcd_cluster(1, tls=True) as cluster:
        assert cluster.tls is not None
        settings = ClusterSettings(
            etcd_endpoints=cluster.endpoints,
            ca_file=str(cluster.tls.ca),
            cert_file=str(cluster.tls.cert),
            key_file=str(cluster.tls.key),
            timeout=5,
        )
        store = open_store(settings, tmp_path / "state.db")
        try:
            assert isinstance(store, EtcdStore)
            assert store.add_revision("app", "{}", "", "a.yml") == 1
            assert store.names() == ["app"]
        finally:
            store.close()
        # Without a client certificate etcd refuses: a sentence, not a hang.
        bare = EtcdStore(cluster.endpoints, timeout=2)
        try:
            with pytest.raises(StoreUnavailableError, match="does not answer"):
                bare.names()
        finally:
            bare.close()
        assert not (tmp_path / "state.db").exists()


async def _until_answering(client: SchedulerClient) -> None:
    """Wait (up to 30 s) until the schedd just started answers on the bus."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            await client.status()
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_schedd_with_a_cluster_section_keeps_its_deployments_in_etcd(
    private_bus: PrivateBus, zlayer_prefix: Paths, etcd_once: EtcdCluster
) -> None:
    """The real zlayer-schedd, its config naming the etcd: a deployment lands in etcd,
    none in the SQLite file, and a restarted schedd lists it from there."""
    config = zlayer_prefix.daemon_config("schedd")
    endpoints = ", ".join(f'"{e}"' for e in etcd_once.endpoints)
    config.write_text(config.read_text() + f"\n[cluster]\netcd_endpoints = [{endpoints}]\n")
    name = f"etcd-{uuid.uuid4().hex[:8]}"
    spec = f"version: v1\ndeployment: {name}\nservices: {{}}\n"

    async def call(scenario: Callable[[SchedulerClient], Any]) -> Any:
        bus = open_bus(private_bus.address)
        client = SchedulerClient(bus)
        try:
            await _until_answering(client)
            return await scenario(client)
        finally:
            bus.close()

    async def deploy(client: SchedulerClient) -> None:
        await client.deploy(spec, "etcd.zlayer.yml", {})

    async def names(client: SchedulerClient) -> list[str]:
        return [d.name for d in await client.list_deployments()]

    try:
        with daemon_process("schedd", private_bus, zlayer_prefix):
            asyncio.run(call(deploy))
        with daemon_process("schedd", private_bus, zlayer_prefix):
            assert name in asyncio.run(call(names))
        store = EtcdStore(etcd_once.endpoints)
        try:
            stored = store.get(name)
            assert stored is not None and stored.spec_text == spec
        finally:
            store.remove(name)
            store.close()
        assert not (zlayer_prefix.daemon_state("schedd") / "state.db").exists()
    finally:
        log = zlayer_prefix.prefix / "schedd.log"
        print(log.read_text(errors="replace")[-3000:] if log.exists() else "")


def test_schedd_answers_on_the_bus_while_etcd_does_not(
    private_bus: PrivateBus, zlayer_prefix: Paths
) -> None:
    """etcd frozen (SIGSTOP: its connections open, nothing answered): a deployment's
    status waits for the store in schedd's store thread while schedd goes on
    answering what needs no store (its own status); once etcd answers again, the
    deployment's status comes, and the deploy's event (posted, not waited for) is
    in the store."""
    import signal

    with etcd_cluster(1) as cluster:
        config = zlayer_prefix.daemon_config("schedd")
        endpoints = ", ".join(f'"{e}"' for e in cluster.endpoints)
        config.write_text(config.read_text() + f"\n[cluster]\netcd_endpoints = [{endpoints}]\n")
        name = f"frozen-{uuid.uuid4().hex[:8]}"
        spec = f"version: v1\ndeployment: {name}\nservices: {{}}\n"
        etcd_pid = cluster.processes[cluster.members[0].name].pid

        async def scenario() -> None:
            bus = open_bus(private_bus.address)
            client = SchedulerClient(bus)
            try:
                await _until_answering(client)
                await client.deploy(spec, "frozen.zlayer.yml", {})
                os.kill(etcd_pid, signal.SIGSTOP)
                try:
                    waiting = asyncio.ensure_future(client.get_deployment(name))
                    await asyncio.sleep(0.5)  # schedd's store call now waits on etcd
                    await client.status()
                    # Answered before the store call ended: it never held schedd's loop.
                    assert not waiting.done()
                finally:
                    os.kill(etcd_pid, signal.SIGCONT)
                assert (await waiting).name == name
                events = await client.list_events(name, 10)
                assert any(e.kind == "deploy" for e in events)
            finally:
                bus.close()

        try:
            with daemon_process("schedd", private_bus, zlayer_prefix):
                asyncio.run(scenario())
        finally:
            log = zlayer_prefix.prefix / "schedd.log"
            print(log.read_text(errors="replace")[-3000:] if log.exists() else "")


def test_a_spec_as_large_as_schedd_takes_fits_and_a_larger_change_is_a_sentence(
    etcd_store: EtcdStore,
) -> None:
    from shared.bus import InvalidArgumentError
    from shared.spec.limits import MAX_SPEC_BYTES

    # 1 MiB of spec text and its JSON: over etcd's 1.5 MiB a request, unless compressed.
    lines = [f"  s{i}:\n    image:\n      name: nginx:1\n" for i in range(MAX_SPEC_BYTES // 40)]
    text = ("services:\n" + "".join(lines))[:MAX_SPEC_BYTES]
    as_json = json.dumps({"services": text.splitlines()})
    assert etcd_store.add_revision("big", as_json, text, "big.yml") == 1
    stored = etcd_store.get("big")
    assert stored is not None and stored.spec_text == text and stored.spec_json == as_json
    # What no compression brings under the limit is refused in one sentence.
    noise = base64.b64encode(os.urandom(2 * MAX_SPEC_BYTES)).decode()
    with pytest.raises(InvalidArgumentError) as raised:
        etcd_store.add_revision("big", "{}", noise, "noise.yml")
    assert "too large" in str(raised.value) and "\n" not in str(raised.value)
    assert etcd_store.revisions("big") == [1]


def test_a_revision_whose_commit_answer_was_lost_is_not_added_twice(
    etcd_store: EtcdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd applied the transaction but the answer never came (a timeout, a leader
    change): the call tries again, and finds its own write instead of adding another."""
    import aetcd  # type: ignore[import-untyped]

    real = etcd_store._txn
    lost = []

    async def commit_then_lose_the_answer(compare: list[Any], success: list[Any]) -> bool:
        done = await real(compare, success)
        if not lost:
            lost.append(done)
            raise aetcd.ConnectionTimeoutError("Deadline Exceeded")
        return done

    monkeypatch.setattr(etcd_store, "_txn", commit_then_lose_the_answer)
    assert etcd_store.add_revision("app", "{}", "", "a.yml") == 1
    assert lost == [True]
    assert etcd_store.revisions("app") == [1]
    assert etcd_store.add_revision("app", "{}", "", "a.yml") == 2


def test_three_members_with_the_cluster_cas_certificates_are_one_target(tmp_path: Path) -> None:
    """Members and schedd's node each with a certificate from the cluster CA (as node
    init and join leave them): the store reaches all three as one gRPC target, as
    their certificates share the cluster's name, and goes on when the member it
    used is killed."""
    from shared.cluster import pki

    authority = pki.Authority.make()

    def node_tls(node_id: str, server_name: str | None = None) -> TLSFiles:
        files = pki.ClusterFiles(tmp_path / "pki" / node_id)
        files.write_ca_certificate(authority.certificate)
        files.write_node(*authority.issue(node_id, ["127.0.0.1"]))
        return TLSFiles(files.ca_cert, files.node_cert, files.node_key, server_name)

    mine = node_tls("schedd-node", server_name=pki.ANY_NODE)
    with etcd_cluster(3, member_tls=node_tls, client_tls=mine) as cluster:
        store = EtcdStore(cluster.endpoints, mine)
        try:
            assert store.add_revision("app", "{}", "", "a.yml") == 1
            cluster.kill(0)
            assert store.add_revision("app", "{}", "", "a.yml") == 2
            assert store.names() == ["app"]
        finally:
            store.close()
