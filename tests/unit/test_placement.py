"""Placement across a cluster's nodes: the rules one by one, then properties of any plan."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.schedd.placement import (
    Demand,
    Group,
    NodeMode,
    Pin,
    Plan,
    _place,
    demand,
    place,
)
from shared.spec import parse_spec
from shared.wire.cluster import NodeCapacity, NodeRecord, NodeState, Placement

GIB = 1 << 30
MIB = 1 << 20


def node(
    name: str,
    cpu: float = 8.0,
    memory: int = 16 * GIB,
    labels: dict[str, str] | None = None,
    state: NodeState = "ready",
) -> NodeRecord:
    return NodeRecord(
        id=name,
        name=name,
        address="192.0.2.1",
        peer_port=7443,
        labels=labels or {},
        capacity=NodeCapacity(cpu=cpu, memory=memory),
        state=state,
    )


def want(
    service: str,
    count: int,
    cpu: float = 0.0,
    memory: int = 0,
    mode: NodeMode = "shared",
    labels: dict[str, str] | None = None,
    prefer: dict[str, str] | None = None,
    affinity: str | Pin = "spread",
    revision: int = 1,
) -> Demand:
    assert affinity in ("spread", "pack") or isinstance(affinity, Pin)
    return Demand(
        deployment="app",
        service=service,
        revision=revision,
        groups=(Group(count=count, cpu=cpu, memory=memory, affinity=affinity),),  # type: ignore[arg-type]
        node_mode=mode,
        labels=labels or {},
        prefer_labels=prefer or {},
    )


def where(plan: Plan) -> dict[str, str]:
    """Replica name -> node id."""
    return {p.replica: node_id for node_id, placed in plan.nodes.items() for p in placed}


def per_node(plan: Plan, service: str | None = None) -> dict[str, int]:
    return {
        node_id: sum(1 for p in placed if service is None or p.service == service)
        for node_id, placed in plan.nodes.items()
    }


# ---------------------------------------------------------------- the rules


def test_a_service_spreads_one_replica_a_node_before_doubling_up() -> None:
    nodes = [node("a"), node("b"), node("c")]
    assert sorted(per_node(place(nodes, [want("web", 3)], {})).values()) == [1, 1, 1]
    assert sorted(per_node(place(nodes, [want("web", 7)], {})).values()) == [2, 2, 3]


def test_spreading_goes_to_the_least_loaded_node() -> None:
    nodes = [node("a"), node("b"), node("c")]
    plan = place(nodes, [want("big", 2, cpu=4.0), want("web", 1, cpu=1.0)], {})
    assert per_node(plan, "big") == {"a": 1, "b": 1, "c": 0}
    assert per_node(plan, "web") == {"a": 0, "b": 0, "c": 1}


def test_reservations_never_exceed_a_node_and_the_rest_wait_with_the_reason() -> None:
    nodes = [node("a", cpu=2.5), node("b", cpu=2.0)]
    plan = place(nodes, [want("web", 3, cpu=1.0)], {})
    assert plan.placed() == 3
    plan = place(nodes, [want("web", 1, cpu=4.0)], {})
    assert plan.placed() == 0
    assert [p.reason for p in plan.pending] == ["no node has 4 CPUs free; the largest has 2.5"]
    plan = place(nodes, [want("web", 5, cpu=1.0)], {})
    assert plan.placed() == 4
    assert [(p.replica, p.reason) for p in plan.pending] == [
        ("app-web-5", "no node has 1 CPU free; the largest has 0.5")
    ]


def test_memory_that_fits_nowhere_is_named_in_a_sentence() -> None:
    plan = place([node("a", memory=512 * MIB)], [want("db", 1, memory=GIB)], {})
    assert plan.pending[0].reason == "no node has 1 GiB of memory free; the largest has 512 MiB"


def test_required_labels_are_met_or_the_replica_waits() -> None:
    nodes = [node("a", labels={"zone": "us"}), node("b", labels={"zone": "eu", "disk": "ssd"})]
    plan = place(nodes, [want("web", 3, labels={"zone": "eu"})], {})
    assert per_node(plan) == {"a": 0, "b": 3}
    plan = place(nodes, [want("web", 1, labels={"zone": "ap"})], {})
    assert plan.pending[0].reason == "no ready node has the labels zone=ap"


def test_preferred_labels_win_over_load() -> None:
    nodes = [node("a"), node("b", labels={"disk": "ssd"})]
    ssd = {"disk": "ssd"}
    plan = place(nodes, [want("fill", 1, cpu=6.0, labels=ssd), want("db", 1, prefer=ssd)], {})
    assert where(plan)["app-db-1"] == "b"
    # Preference is soft: with the preferred node full, the replica goes elsewhere.
    plan = place(
        nodes, [want("fill", 1, cpu=8.0, labels=ssd), want("db", 1, cpu=1.0, prefer=ssd)], {}
    )
    assert where(plan)["app-db-1"] == "a"


def test_dedicated_puts_one_replica_a_node_and_shares_nodes_with_other_services() -> None:
    nodes = [node("a"), node("b"), node("c")]
    plan = place(nodes, [want("db", 3, mode="dedicated"), want("web", 3)], {})
    assert not plan.pending
    assert per_node(plan, "db") == {"a": 1, "b": 1, "c": 1}
    # Placed after it, another service's replicas join the dedicated ones' nodes.
    assert per_node(plan, "web") == {"a": 1, "b": 1, "c": 1}
    # Whatever the affinity: a packing dedicated service still takes a node a replica.
    plan = place(nodes, [want("db", 2, mode="dedicated", affinity="pack")], {})
    assert sorted(per_node(plan, "db").values()) == [0, 1, 1]


def test_dedicated_replicas_join_nodes_that_already_run_other_services() -> None:
    nodes = [node("a"), node("b")]
    before = place(nodes, [want("web", 4)], {})
    plan = place(nodes, [want("web", 4), want("db", 2, mode="dedicated")], before.nodes)
    assert not plan.pending
    assert per_node(plan, "db") == {"a": 1, "b": 1}
    assert per_node(plan, "web") == per_node(before, "web")


def test_a_dedicated_replica_goes_to_the_node_with_the_fewest_replicas() -> None:
    nodes = [node("a"), node("b"), node("c")]
    busy = place(nodes, [want("web", 3, affinity=Pin("id", "a")), want("api", 1)], {})
    assert per_node(busy) == {"a": 3, "b": 1, "c": 0}
    wants = [want("web", 3, affinity=Pin("id", "a")), want("api", 1)]
    plan = place(nodes, [*wants, want("db", 1, mode="dedicated")], busy.nodes)
    assert where(plan)["app-db-1"] == "c"
    plan = place(nodes, [*wants, want("db", 2, mode="dedicated")], busy.nodes)
    assert per_node(plan, "db") == {"a": 0, "b": 1, "c": 1}


def test_more_dedicated_replicas_than_nodes_wait_with_the_reason() -> None:
    nodes = [node("a"), node("b")]
    plan = place(nodes, [want("db", 5, mode="dedicated")], {})
    assert per_node(plan, "db") == {"a": 1, "b": 1}
    assert [p.replica for p in plan.pending] == ["app-db-3", "app-db-4", "app-db-5"]
    assert {p.reason for p in plan.pending} == {
        "every node that could take it already runs one of its replicas, and node_mode "
        "dedicated needs a different node for each replica"
    }
    plan = place(nodes, [want("cache", 1, mode="exclusive"), want("db", 2, mode="dedicated")], {})
    assert [p.reason for p in plan.pending] == [
        "every node that could take it already runs one of its replicas or an exclusive "
        "replica, and node_mode dedicated needs a different node for each replica"
    ]


def test_an_exclusive_replica_is_alone_on_its_node() -> None:
    nodes = [node("a"), node("b"), node("c")]
    plan = place(nodes, [want("db", 2, mode="exclusive"), want("web", 4)], {})
    for placed in plan.nodes.values():
        if any(p.service == "db" for p in placed):
            assert len(placed) == 1
    assert sum(per_node(plan, "web").values()) == 4
    # One replica a node, even of the same service.
    plan = place(nodes, [want("db", 4, mode="exclusive")], {})
    assert plan.placed() == 3
    assert plan.pending[0].reason == (
        "no node that could take it is empty, and node_mode exclusive needs a node "
        "with nothing else on it"
    )
    # Nothing placed after joins it, shared or dedicated.
    plan = place(nodes[:1], [want("db", 1, mode="exclusive"), want("web", 1)], {})
    assert [p.reason for p in plan.pending] == [
        "every node that could take it runs an exclusive replica"
    ]
    plan = place(nodes[:1], [want("db", 1, mode="exclusive"), want("api", 1, mode="dedicated")], {})
    assert [p.replica for p in plan.pending] == ["app-api-1"]


def test_an_exclusive_replica_needs_an_empty_node_not_one_with_shared_replicas() -> None:
    nodes = [node("a"), node("b")]
    before = place(nodes, [want("web", 2)], {})
    plan = place(nodes, [want("web", 2), want("db", 1, mode="exclusive")], before.nodes)
    assert where(plan) == where(before)
    assert plan.pending[0].reason.startswith("no node that could take it is empty")
    plan = place(
        [*nodes, node("c")], [want("web", 2), want("db", 1, mode="exclusive")], before.nodes
    )
    assert where(plan)["app-db-1"] == "c"


def test_pack_fills_one_node_before_the_next() -> None:
    nodes = [node("a", cpu=4.0), node("b", cpu=4.0), node("c", cpu=4.0)]
    plan = place(nodes, [want("batch", 6, cpu=1.0, affinity="pack")], {})
    assert sorted(per_node(plan).values()) == [0, 2, 4]


def test_pin_keeps_replicas_to_the_named_node_or_label() -> None:
    nodes = [node("a"), node("b", labels={"gpu": "yes"}), node("c")]
    assert set(where(place(nodes, [want("w", 3, affinity=Pin("id", "c"))], {})).values()) == {"c"}
    assert set(where(place(nodes, [want("w", 3, affinity=Pin("gpu", "yes"))], {})).values()) == {
        "b"
    }
    plan = place(nodes, [want("w", 1, affinity=Pin("id", "zz"))], {})
    assert plan.pending[0].reason == "no ready node matches the affinity pin id=zz"


def test_only_ready_nodes_take_replicas() -> None:
    nodes = [node("a", state="draining"), node("b", state="down")]
    plan = place(nodes, [want("web", 1)], {})
    assert plan.nodes == {"a": [], "b": []}
    assert plan.pending[0].reason == "no node is ready (the cluster's nodes are down or draining)"
    assert place([], [want("web", 1)], {}).pending[0].reason == (
        "no node is ready: the cluster has no nodes"
    )


def test_replicas_stay_put_and_only_a_lost_or_draining_nodes_move() -> None:
    nodes = [node(name) for name in "abcd"]
    wants = [want("web", 6, cpu=1.0), want("api", 3), want("db", 1, mode="exclusive")]
    first = place(nodes, wants, {})
    before = where(first)
    assert place(nodes, wants, first.nodes) == first

    lost = [n for n in nodes if n.id != "b"]
    after = where(place(lost, wants, first.nodes))
    moved = {name for name in before if after[name] != before[name]}
    assert moved == {name for name, node_id in before.items() if node_id == "b"}

    draining = [node("c", state="draining") if n.id == "c" else n for n in nodes]
    plan = place(draining, wants, first.nodes)
    assert plan.nodes["c"] == []
    after = where(plan)
    assert {name for name in before if after[name] != before[name]} == {
        name for name, node_id in before.items() if node_id == "c"
    }


def test_a_new_revision_keeps_each_replica_on_its_node() -> None:
    nodes = [node("a"), node("b")]
    first = place(nodes, [want("web", 3, cpu=1.0)], {})
    second = place(nodes, [want("web", 3, cpu=2.0, revision=2)], first.nodes)
    assert where(second) == where(first)
    assert {(p.revision, p.cpu) for placed in second.nodes.values() for p in placed} == {(2, 2.0)}


def test_a_replica_that_no_longer_fits_moves_and_scaling_down_drops_the_last() -> None:
    nodes = [node("a", labels={"zone": "eu"}), node("b", labels={"zone": "eu"})]
    first = place(nodes, [want("web", 2, labels={"zone": "eu"})], {})
    relabelled = [nodes[0], node("b", labels={"zone": "us"})]
    assert set(
        where(place(relabelled, [want("web", 2, labels={"zone": "eu"})], first.nodes)).values()
    ) == {"a"}
    smaller = place(nodes, [want("web", 1, labels={"zone": "eu"})], first.nodes)
    assert where(smaller) == {"app-web-1": where(first)["app-web-1"]}


def test_a_plan_becomes_one_assignment_document_per_node() -> None:
    plan = place([node("a"), node("b", state="draining")], [want("web", 2)], {})
    documents = {doc.node: doc for doc in plan.assignments(generation=7)}
    assert set(documents) == {"a", "b"}
    assert {doc.generation for doc in documents.values()} == {7}
    assert [p.replica for p in documents["a"].replicas] == ["app-web-1", "app-web-2"]
    assert documents["b"].replicas == []


def test_one_service_asked_for_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="app/web is asked for twice"):
        place([node("a")], [want("web", 1), want("web", 2)], {})


def test_a_spec_becomes_a_demand_with_replica_groups_counted_and_overridden() -> None:
    spec = parse_spec(
        """\
version: v1
deployment: app
services:
  db:
    image: postgres:16
    resources: {cpu: 1, memory: 1Gi}
    node_mode: dedicated
    node_selector: {labels: {disk: ssd}, prefer_labels: {zone: eu}}
    replica_groups:
      - {role: primary, count: 1}
      - {role: read, count: 2, resources: {cpu: 0.5}, affinity: {pin: "zone=eu"}}
  web:
    image: nginx
    affinity: pack
""",
        "app.zlayer.yml",
    )
    db = demand("app", "db", spec.services["db"], revision=3, replicas=9)
    assert db.groups == (
        Group(count=1, cpu=1.0, memory=GIB, affinity="spread", role="primary"),
        Group(count=2, cpu=0.5, memory=0, affinity=Pin("zone", "eu"), role="read"),
    )
    assert (db.node_mode, dict(db.labels), dict(db.prefer_labels)) == (
        "dedicated",
        {"disk": "ssd"},
        {"zone": "eu"},
    )
    assert [name for name, _ in db.replica_names()] == ["app-db-1", "app-db-2", "app-db-3"]
    web = demand("app", "web", spec.services["web"], revision=3, replicas=2)
    assert web.groups == (Group(count=2, affinity="pack"),)


def test_without_an_affinity_a_service_packs_and_spread_is_asked_for() -> None:
    spec = parse_spec(
        """\
version: v1
deployment: app
services:
  web: {image: nginx, resources: {cpu: 1}}
  api: {image: nginx, resources: {cpu: 1}, affinity: spread}
""",
        "app.zlayer.yml",
    )
    web = demand("app", "web", spec.services["web"], revision=1, replicas=3)
    api = demand("app", "api", spec.services["api"], revision=1, replicas=3)
    assert web.groups == (Group(count=3, cpu=1.0, affinity="pack"),)
    nodes = [node("a"), node("b"), node("c")]
    assert sorted(per_node(place(nodes, [web], {})).values()) == [0, 0, 3]
    assert per_node(place(nodes, [api], {})) == {"a": 1, "b": 1, "c": 1}


# ---------------------------------------------------------------- properties

LABELS = st.dictionaries(
    st.sampled_from(["zone", "disk"]), st.sampled_from(["eu", "us"]), max_size=2
)

nodes_strategy = st.lists(
    st.builds(
        node,
        name=st.sampled_from([f"n{i}" for i in range(10)]),
        cpu=st.sampled_from([0.0, 1.0, 2.0, 4.0, 8.0]),
        memory=st.sampled_from([0, 512 * MIB, 2 * GIB, 8 * GIB]),
        labels=LABELS,
        state=st.sampled_from(["ready", "ready", "ready", "draining", "down"]),
    ),
    max_size=8,
    unique_by=lambda record: record.id,
)

affinity_strategy = st.one_of(
    st.sampled_from(["spread", "spread", "pack"]),
    st.builds(Pin, st.sampled_from(["zone", "id"]), st.sampled_from(["eu", "n1", "n2"])),
)


@st.composite
def demands_strategy(draw: st.DrawFn) -> list[Demand]:
    names = draw(st.lists(st.sampled_from(list("abcdefg")), max_size=6, unique=True))
    result = []
    for name in names:
        groups = draw(
            st.lists(
                st.builds(
                    Group,
                    count=st.integers(0, 6),
                    cpu=st.sampled_from([0.0, 0.5, 1.0, 2.5]),
                    memory=st.sampled_from([0, 256 * MIB, GIB]),
                    affinity=affinity_strategy,
                ),
                min_size=1,
                max_size=2,
            )
        )
        result.append(
            Demand(
                deployment=draw(st.sampled_from(["app", "ops"])),
                service=name,
                revision=draw(st.integers(1, 3)),
                groups=tuple(groups),
                node_mode=draw(st.sampled_from(["shared", "shared", "dedicated", "exclusive"])),
                labels=draw(LABELS) if draw(st.booleans()) else {},
                prefer_labels=draw(LABELS),
            )
        )
    return result


def check_rules(nodes: Sequence[NodeRecord], wants: Sequence[Demand], plan: Plan) -> None:
    """What must hold of any plan, checked from the plan alone."""
    records = {record.id: record for record in nodes}
    assert set(plan.nodes) == set(records)
    by_replica: dict[tuple[str, str, str], tuple[Demand, Group]] = {
        (w.deployment, w.service, name): (w, group)
        for w in wants
        for name, group in w.replica_names()
    }
    seen: Counter[tuple[str, str, str]] = Counter()
    for node_id, placed in plan.nodes.items():
        record = records[node_id]
        if record.state != "ready":
            assert placed == []
            continue
        assert sum(p.cpu for p in placed) <= record.capacity.cpu + 1e-6, "over CPU capacity"
        assert sum(p.memory for p in placed) <= record.capacity.memory, "over memory capacity"
        modes = []
        for p in placed:
            ident = (p.deployment, p.service, p.replica)
            seen[ident] += 1
            w, group = by_replica[ident]
            modes.append(w.node_mode)
            assert (p.revision, p.cpu, p.memory) == (w.revision, group.cpu, group.memory)
            assert all(record.labels.get(k) == v for k, v in w.labels.items()), "labels unmet"
            if isinstance(group.affinity, Pin):
                pin = group.affinity
                got = record.id if pin.key == "id" else record.labels.get(pin.key)
                assert got == pin.value, "pin unmet"
        if "exclusive" in modes:
            assert len(placed) == 1, "an exclusive replica has company"
        dedicated = Counter(
            (p.deployment, p.service)
            for p, mode in zip(placed, modes, strict=True)
            if mode == "dedicated"
        )
        assert all(count == 1 for count in dedicated.values()), "two dedicated on one node"
    pending = Counter((p.deployment, p.service, p.replica) for p in plan.pending)
    assert seen + pending == Counter(by_replica.keys()), "each replica placed once or pending"
    for waiting in plan.pending:
        assert waiting.reason and "\n" not in waiting.reason
        w, group = by_replica[(waiting.deployment, waiting.service, waiting.replica)]
        for node_id, placed in plan.nodes.items():
            assert not fits(records[node_id], placed, w, group, wants), "pending, yet it fits"


def fits(
    record: NodeRecord,
    placed: Sequence[Placement],
    w: Demand,
    group: Group,
    wants: Sequence[Demand],
) -> bool:
    """Whether one more replica of ``w``'s ``group`` could go on this node as it is."""
    if record.state != "ready":
        return False
    if not all(record.labels.get(k) == v for k, v in w.labels.items()):
        return False
    if isinstance(group.affinity, Pin):
        pin = group.affinity
        if (record.id if pin.key == "id" else record.labels.get(pin.key)) != pin.value:
            return False
    own = (w.deployment, w.service)
    services = {(p.deployment, p.service) for p in placed}
    modes = {x.node_mode for x in wants if (x.deployment, x.service) in services}
    if "exclusive" in modes:
        return False
    if placed and w.node_mode == "exclusive":
        return False
    if w.node_mode == "dedicated" and own in services:
        return False
    cpu_left = record.capacity.cpu - sum(p.cpu for p in placed)
    memory_left = record.capacity.memory - sum(p.memory for p in placed)
    return cpu_left + 1e-9 >= group.cpu and memory_left >= group.memory


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(nodes=nodes_strategy, wants=demands_strategy(), before=nodes_strategy)
def test_any_plan_keeps_every_rule_and_a_rerun_changes_nothing(
    nodes: list[NodeRecord], wants: list[Demand], before: list[NodeRecord]
) -> None:
    # What was in force: a plan made for another set of nodes (some gone,
    # some new, labels and capacities changed) and possibly other revisions.
    current = place(before, wants, {}).nodes
    plan = place(nodes, wants, current)
    check_rules(nodes, wants, plan)

    # Run on its own output, nothing changes.
    again = place(nodes, wants, plan.nodes)
    assert again == plan

    # The walks pick what ranking every node would.
    assert _place(nodes, wants, current, walks=False) == plan


@FUZZ
@given(
    nodes=nodes_strategy,
    wants=demands_strategy(),
    lost=st.sets(st.sampled_from([f"n{i}" for i in range(10)])),
)
def test_losing_nodes_moves_only_their_replicas(
    nodes: list[NodeRecord], wants: list[Demand], lost: set[str]
) -> None:
    first = place(nodes, wants, {})
    left = [record for record in nodes if record.id not in lost]
    second = place(left, wants, first.nodes)
    check_rules(left, wants, second)
    before, after = where(first), where(second)
    for name, node_id in before.items():
        if node_id not in lost:
            assert after[name] == node_id, f"{name} moved off {node_id}, which is still there"
