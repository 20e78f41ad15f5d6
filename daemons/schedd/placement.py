"""Where each replica runs in a cluster: a pure function from nodes and wants to placements.

The leading schedd calls :func:`place` with the live node records, what every
service wants (:class:`Demand`, made from a service's spec by :func:`demand`)
and the placements in force, and writes the result as per-node assignments.
Nothing here does I/O or keeps state between calls.

The rules, in the order they apply:

- Only nodes in state ``ready`` take replicas. A replica on a node that is
  gone, draining or down is placed again; every other replica stays where it
  is while it still fits there (same node, new revision and reservation), so a
  placement run on its own output changes nothing.
- ``node_selector.labels`` must all match the node's labels; an affinity
  ``pin: "key=value"`` (or ``pin: "id=NODE"``) keeps the replicas to nodes
  with that label (that node).
- ``node_mode``, as upstream's scheduler means it: ``shared`` replicas go
  anywhere they fit; ``dedicated``: at most one of the service's replicas on a
  node (each replica a node of its own, upstream's "1:1"), while other
  services' replicas may share that node, those already there and those
  placed after;
  ``exclusive``: a replica goes only onto a node with nothing on it, and
  nothing else joins it there, so each replica is alone on its node.
  (Upstream's scheduler checks for an empty node when it places an exclusive
  replica; its README's "no other services" on that node holds here too for
  what is placed after.)
- Resources: ``resources.cpu`` and ``resources.memory`` are reserved; a node
  takes a replica only while the sum of its reservations stays within its
  capacity, in every mode (upstream checks this for shared replicas only).
- Choice among the nodes that fit: more ``prefer_labels`` matched first; then,
  for a dedicated or exclusive replica, the node with the fewest replicas (as
  upstream's scheduler isolates them), then the least loaded, whatever the
  affinity. A shared replica, with ``affinity: pack`` (the default when a
  service names none, as upstream's is) or a ``pin``, goes to the fullest node
  that still fits, so replicas fill one node before the next; with ``spread``,
  to the node with the fewest replicas of that service, then the least loaded
  (the larger of its CPU and memory shares in use, then the fewest replicas).
  ``affinity: spread`` is what a service that must survive a node's loss asks
  for: packed, all its replicas may be on the one node lost.
- ``replica_groups`` (upstream's shape): the service's replicas are the groups'
  counts in declaration order, each group placed with its own resources and
  affinity (a group's default is ``spread``, as upstream's); spreading counts
  the whole service.

Services are placed hardest first (exclusive, dedicated, with required labels
or a pin, then the largest reservations), each one's replicas in name order.
A replica that fits nowhere is :class:`Pending`, with one sentence saying why
("no node has 4 CPUs free; the largest has 2.5"), said of the nodes as the
placement leaves them.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from shared.wire.cluster import NodePlacements, NodeRecord, Placement

if TYPE_CHECKING:
    from shared.spec.models import Affinity as SpecAffinity
    from shared.spec.models import ServiceSpec

NodeMode = Literal["shared", "dedicated", "exclusive"]

# CPU reservations are fractions: sums must not fail a fit by a rounding error.
_CPU_SLACK = 1e-9


@dataclass(frozen=True, slots=True)
class Pin:
    """Only nodes whose label ``key`` is ``value`` (``key == "id"``: the node with that id)."""

    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


Affinity = Literal["spread", "pack"] | Pin


@dataclass(frozen=True, slots=True)
class Group:
    """A run of a service's replicas sharing resources and affinity (a replica group)."""

    count: int
    cpu: float = 0.0
    memory: int = 0
    affinity: Affinity = "pack"  # upstream's default for a service that names none
    role: str = ""


@dataclass(frozen=True, slots=True)
class Demand:
    """What one service wants placed: its replicas (by group) and their constraints."""

    deployment: str
    service: str
    revision: int
    groups: tuple[Group, ...]
    node_mode: NodeMode = "shared"
    labels: Mapping[str, str] = field(default_factory=dict)
    prefer_labels: Mapping[str, str] = field(default_factory=dict)

    def replica_names(self) -> list[tuple[str, Group]]:
        """Each replica's cluster-wide name with its group; instances count from 1 across groups."""
        names: list[tuple[str, Group]] = []
        for group in self.groups:
            for _ in range(group.count):
                names.append((f"{self.deployment}-{self.service}-{len(names) + 1}", group))
        return names


@dataclass(frozen=True, slots=True)
class Pending:
    """A replica no node can take now, and why."""

    deployment: str
    service: str
    replica: str
    reason: str


@dataclass(slots=True)
class Plan:
    """The placement: every given node's replicas (empty for a node not ready) and the rest."""

    nodes: dict[str, list[Placement]]
    pending: list[Pending]

    def placed(self) -> int:
        return sum(len(replicas) for replicas in self.nodes.values())

    def assignments(self, generation: int) -> list[NodePlacements]:
        """One document per node, stamped with ``generation``, as the nodes read them."""
        return [
            NodePlacements(node=node_id, generation=generation, replicas=list(replicas))
            for node_id, replicas in self.nodes.items()
        ]


def _affinity(value: SpecAffinity) -> Affinity:
    if isinstance(value, str):
        return value
    key, _, wanted = value.pin.partition("=")
    return Pin(key.strip(), wanted.strip())


def demand(
    deployment: str, name: str, service: ServiceSpec, revision: int, replicas: int
) -> Demand:
    """The :class:`Demand` of one service of a stored revision.

    ``replicas`` is the count the scale settings (or a manual hold) ask for;
    ``replica_groups``, when given, set the count themselves, as upstream's do.
    """
    selector = service.node_selector
    own = service.resources
    if service.replica_groups:
        groups = tuple(
            Group(
                count=group.count,
                cpu=float((group.resources or own).cpu or 0.0),
                memory=int((group.resources or own).memory or 0),
                affinity=_affinity(group.affinity),
                role=group.role,
            )
            for group in service.replica_groups
        )
    else:
        groups = (
            Group(
                count=replicas,
                cpu=float(own.cpu or 0.0),
                memory=int(own.memory or 0),
                affinity="pack" if service.affinity is None else _affinity(service.affinity),
            ),
        )
    return Demand(
        deployment=deployment,
        service=name,
        revision=revision,
        groups=groups,
        node_mode=service.node_mode,
        labels=dict(selector.labels) if selector else {},
        prefer_labels=dict(selector.prefer_labels) if selector else {},
    )


class _Node:
    """A ready node while placing: what is left of it and what it holds."""

    __slots__ = (
        "cpu_cap",
        "cpu_free",
        "exclusive",
        "id",
        "index",
        "labels",
        "load",
        "mem_cap",
        "mem_free",
        "per_service",
        "placed",
    )

    def __init__(self, index: int, record: NodeRecord) -> None:
        self.index = index
        self.id = record.id
        self.labels = record.labels
        self.cpu_cap = max(0.0, float(record.capacity.cpu))
        self.mem_cap = max(0, int(record.capacity.memory))
        self.cpu_free = self.cpu_cap
        self.mem_free = self.mem_cap
        self.load = 0.0
        self.per_service: dict[tuple[str, str], int] = {}
        self.exclusive = False  # holds an exclusive replica: nothing else joins it
        self.placed: list[Placement] = []

    def fits(self, key: tuple[str, str], mode: NodeMode, cpu: float, memory: int) -> bool:
        if self.exclusive:
            return False
        if mode == "exclusive" and self.placed:
            return False
        if mode == "dedicated" and key in self.per_service:
            return False
        return self.cpu_free + _CPU_SLACK >= cpu and self.mem_free >= memory

    def take(self, key: tuple[str, str], mode: NodeMode, placement: Placement) -> None:
        self.placed.append(placement)
        self.per_service[key] = self.per_service.get(key, 0) + 1
        if mode == "exclusive":
            self.exclusive = True
        self.cpu_free -= placement.cpu
        self.mem_free -= placement.memory
        cpu_share = 1.0 - self.cpu_free / self.cpu_cap if self.cpu_cap > 0 else 0.0
        mem_share = 1.0 - self.mem_free / self.mem_cap if self.mem_cap > 0 else 0.0
        self.load = max(cpu_share, mem_share)


def _labelled(node: _Node, labels: Mapping[str, str]) -> bool:
    got = node.labels
    return all(got.get(key) == value for key, value in labels.items())


def _pinned(node: _Node, pin: Pin) -> bool:
    if pin.key == "id":
        return node.id == pin.value
    return node.labels.get(pin.key) == pin.value


def _preferred(node: _Node, prefer: Mapping[str, str]) -> int:
    got = node.labels
    return sum(1 for key, value in prefer.items() if got.get(key) == value)


def _cpus(value: float) -> str:
    return f"{value:.3g} CPU{'' if value == 1 else 's'}"


def _memory(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"


class _Placer:
    def __init__(self, nodes: Iterable[NodeRecord], *, walks: bool) -> None:
        self.walks = walks  # False: rank every node each time (what the walks must match)
        self.records = sorted(nodes, key=lambda record: record.id)
        self.nodes = [
            _Node(index, record)
            for index, record in enumerate(r for r in self.records if r.state == "ready")
        ]
        self.by_id = {node.id: node for node in self.nodes}
        self._allowed: dict[tuple[frozenset[tuple[str, str]], Pin | None], set[int]] = {}
        self._preferences: dict[frozenset[tuple[str, str]], list[int]] = {}
        # The open nodes (without an exclusive replica) by (load, replicas,
        # index): a spreading service walks it from the front, a packing one
        # from the back, an exclusive one its empty nodes at the front,
        # instead of ranking every node for every service.
        self.order: list[tuple[float, int, int]] = []
        # The same nodes by (replicas, load, index): a dedicated service
        # walks it from the front. Kept only while dedicated services are
        # left to place (they come before the shared ones).
        self.crowd: list[tuple[int, float, int]] | None = None
        self.unplaced: list[tuple[Demand, Group, list[str]]] = []

    def start(self, *, dedicated: bool) -> None:
        """After the kept replicas are in: order the open nodes."""
        self.order = sorted(
            (node.load, len(node.placed), node.index) for node in self.nodes if not node.exclusive
        )
        self.crowd = (
            sorted((count, load, index) for load, count, index in self.order) if dedicated else None
        )

    def preference(self, prefer: Mapping[str, str]) -> list[int]:
        """How many of ``prefer`` each node matches, by index (empty: nothing preferred)."""
        if not prefer:
            return []
        signature = frozenset(prefer.items())
        found = self._preferences.get(signature)
        if found is None:
            found = [_preferred(node, prefer) for node in self.nodes]
            self._preferences[signature] = found
        return found

    def allowed(self, want: Demand, group: Group) -> set[int] | None:
        """Indices of the nodes labels and pin allow; None: every node."""
        pin = group.affinity if isinstance(group.affinity, Pin) else None
        if not want.labels and pin is None:
            return None
        signature = (frozenset(want.labels.items()), pin)
        found = self._allowed.get(signature)
        if found is None:
            found = {
                node.index
                for node in self.nodes
                if _labelled(node, want.labels) and (pin is None or _pinned(node, pin))
            }
            self._allowed[signature] = found
        return found

    def take(self, node: _Node, key: tuple[str, str], mode: NodeMode, placement: Placement) -> None:
        was_open = not node.exclusive
        before = (node.load, len(node.placed), node.index)
        node.take(key, mode, placement)
        if was_open:
            load, count, index = before
            del self.order[bisect.bisect_left(self.order, before)]
            if self.crowd is not None:
                del self.crowd[bisect.bisect_left(self.crowd, (count, load, index))]
            if not node.exclusive:
                bisect.insort(self.order, (node.load, len(node.placed), node.index))
                if self.crowd is not None:
                    bisect.insort(self.crowd, (len(node.placed), node.load, node.index))

    def choose(self, want: Demand, group: Group, names: list[str]) -> None:
        """Place ``names`` (all of ``group``), best node first, each pick updating that node."""
        key = (want.deployment, want.service)
        mode = want.node_mode
        cpu, memory = group.cpu, group.memory
        allowed = self.allowed(want, group)
        spread = group.affinity == "spread"
        todo = list(reversed(names))  # popped from the end: first name first

        def placement(name: str) -> Placement:
            return Placement(
                deployment=want.deployment,
                service=want.service,
                replica=name,
                revision=want.revision,
                cpu=cpu,
                memory=memory,
            )

        def one_each(ranking: Sequence[tuple[float, float, int]]) -> None:
            # One replica a node, in ranking order, on open nodes that fit and hold none of
            # this service yet; the nodes are picked first because take() reorders the ranking.
            picks: list[_Node] = []
            for _, _, index in ranking:
                if allowed is not None and index not in allowed:
                    continue
                node = self.nodes[index]
                if (
                    key in node.per_service
                    or node.cpu_free + _CPU_SLACK < cpu
                    or node.mem_free < memory
                ):
                    continue
                picks.append(node)
                if len(picks) == len(todo):
                    break
            for node in picks:
                self.take(node, key, mode, placement(todo.pop()))

        if self.walks and not want.prefer_labels and mode == "exclusive":
            # Empty nodes, which lead the order as (0.0, 0, index): by index,
            # as the full ranking below orders nodes that all hold nothing.
            picks: list[_Node] = []
            for _, count, index in self.order:
                if count or len(picks) == len(todo):
                    break
                if allowed is not None and index not in allowed:
                    continue
                node = self.nodes[index]
                if node.cpu_free + _CPU_SLACK >= cpu and node.mem_free >= memory:
                    picks.append(node)
            for node in picks:
                self.take(node, key, mode, placement(todo.pop()))
        elif (
            self.walks and not want.prefer_labels and mode == "dedicated" and self.crowd is not None
        ):
            # One replica a node: the open nodes without this service, fewest
            # replicas first, as the full ranking below orders them.
            one_each(self.crowd)
        elif self.walks and not want.prefer_labels and mode == "shared" and spread:
            # The first round of a spread: open nodes without this service, least
            # loaded first, one replica each; the same picks the full ranking
            # below would make.
            one_each(self.order)
        elif self.walks and not want.prefer_labels and mode == "shared":
            # Packing: the fullest open node that fits, filled before the next.
            for _, _, index in reversed(list(self.order)):
                if not todo:
                    break
                if allowed is not None and index not in allowed:
                    continue
                node = self.nodes[index]
                while todo and node.cpu_free + _CPU_SLACK >= cpu and node.mem_free >= memory:
                    self.take(node, key, mode, placement(todo.pop()))
        if todo:
            self._ranked(want, group, allowed, todo, placement)
        if todo:
            self.unplaced.append((want, group, todo[::-1]))

    def _ranked(
        self,
        want: Demand,
        group: Group,
        allowed: set[int] | None,
        todo: list[str],
        placement: Callable[[str], Placement],
    ) -> None:
        """Every allowed node ranked, for what the walks above do not cover."""
        key = (want.deployment, want.service)
        mode = want.node_mode
        cpu, memory = group.cpu, group.memory
        prefer = want.prefer_labels
        spread = group.affinity == "spread"

        scores = self.preference(prefer)

        def rank(node: _Node) -> tuple[int, float, float, int, int]:
            pref = -scores[node.index] if scores else 0
            if mode != "shared":
                # Upstream's isolation: the node with the fewest replicas.
                return (pref, len(node.placed), node.load, 0, node.index)
            if spread:
                return (pref, node.per_service.get(key, 0), node.load, len(node.placed), node.index)
            return (pref, 0, -node.load, -len(node.placed), -node.index)

        nodes = self.nodes if allowed is None else [self.nodes[index] for index in allowed]
        heap = [(rank(node), node.index) for node in nodes if node.fits(key, mode, cpu, memory)]
        heapq.heapify(heap)
        while todo and heap:
            node = self.nodes[heapq.heappop(heap)[1]]
            self.take(node, key, mode, placement(todo.pop()))
            if node.fits(key, mode, cpu, memory):
                heapq.heappush(heap, (rank(node), node.index))

    def why(self, want: Demand, group: Group) -> str:
        """One sentence: the first constraint that leaves no node for this replica."""
        if not self.nodes:
            states = sorted({record.state for record in self.records})
            if not states:
                return "no node is ready: the cluster has no nodes"
            return f"no node is ready (the cluster's nodes are {' or '.join(states)})"
        nodes = [node for node in self.nodes if _labelled(node, want.labels)]
        if not nodes:
            wanted = ", ".join(f"{key}={value}" for key, value in sorted(want.labels.items()))
            return f"no ready node has the labels {wanted}"
        pin = group.affinity
        if isinstance(pin, Pin):
            nodes = [node for node in nodes if _pinned(node, pin)]
            if not nodes:
                return f"no ready node matches the affinity pin {pin}" + (
                    " among those with the selector's labels" if want.labels else ""
                )
        key = (want.deployment, want.service)
        free = [node for node in nodes if node.fits(key, want.node_mode, 0.0, 0)]
        if not free:
            if want.node_mode == "exclusive":
                return (
                    "no node that could take it is empty, and node_mode exclusive "
                    "needs a node with nothing else on it"
                )
            if want.node_mode == "dedicated":
                held = all(key in node.per_service for node in nodes)
                return (
                    "every node that could take it already runs one of its replicas"
                    + ("" if held else " or an exclusive replica")
                    + ", and node_mode dedicated needs a different node for each replica"
                )
            return "every node that could take it runs an exclusive replica"
        most_cpu = max(node.cpu_free for node in free)
        most_memory = max(node.mem_free for node in free)
        if most_cpu + _CPU_SLACK < group.cpu:
            return f"no node has {_cpus(group.cpu)} free; the largest has {max(most_cpu, 0):.3g}"
        if most_memory < group.memory:
            return (
                f"no node has {_memory(group.memory)} of memory free; "
                f"the largest has {_memory(max(most_memory, 0))}"
            )
        return (
            f"no node has {_cpus(group.cpu)} and {_memory(group.memory)} of memory free "
            "at the same time"
        )


def _order(want: Demand) -> tuple[int, int, float, str, str]:
    """The hardest to place first: exclusive, dedicated, constrained, then the largest."""
    mode = {"exclusive": 0, "dedicated": 1}.get(want.node_mode, 2)
    constrained = 0 if want.labels or any(isinstance(g.affinity, Pin) for g in want.groups) else 1
    size = max((g.cpu + g.memory / (1 << 30) for g in want.groups), default=0.0)
    return (mode, constrained, -size, want.deployment, want.service)


def place(
    nodes: Iterable[NodeRecord],
    wants: Iterable[Demand],
    current: Mapping[str, Sequence[Placement]],
) -> Plan:
    """The placements for ``wants`` on ``nodes``, keeping ``current`` ones that still fit.

    ``current`` maps a node's id to the replicas placed there (the assignments
    in force); a replica no longer wanted (scaled down, removed) is dropped.
    Raises ValueError when one service is in ``wants`` twice.
    """
    return _place(nodes, wants, current, walks=True)


def _place(
    nodes: Iterable[NodeRecord],
    wants: Iterable[Demand],
    current: Mapping[str, Sequence[Placement]],
    *,
    walks: bool,
) -> Plan:
    placer = _Placer(nodes, walks=walks)
    runs = [(want, want.replica_names()) for want in sorted(wants, key=_order)]
    wanted: dict[tuple[str, str, str], tuple[Demand, Group]] = {}
    services: set[tuple[str, str]] = set()
    for want, names in runs:
        if (want.deployment, want.service) in services:
            raise ValueError(f"{want.deployment}/{want.service} is asked for twice")
        services.add((want.deployment, want.service))
        for name, group in names:
            wanted[(want.deployment, want.service, name)] = (want, group)

    # Keep what still fits where it is, node by node in a fixed order, so the
    # outcome does not depend on the order of the mapping.
    kept: set[tuple[str, str, str]] = set()
    for node_id in sorted(current):
        node = placer.by_id.get(node_id)
        if node is None:
            continue  # gone, draining or down: its replicas are placed again
        for old in current[node_id]:
            ident = (old.deployment, old.service, old.replica)
            found = wanted.get(ident)
            if found is None or ident in kept:
                continue
            want, group = found
            key = (want.deployment, want.service)
            if not _labelled(node, want.labels):
                continue
            if isinstance(group.affinity, Pin) and not _pinned(node, group.affinity):
                continue
            if not node.fits(key, want.node_mode, group.cpu, group.memory):
                continue
            if (old.revision, old.cpu, old.memory) != (want.revision, group.cpu, group.memory):
                old = Placement(
                    deployment=want.deployment,
                    service=want.service,
                    replica=old.replica,
                    revision=want.revision,
                    cpu=group.cpu,
                    memory=group.memory,
                )
            node.take(key, want.node_mode, old)
            kept.add(ident)

    modes = [want.node_mode for want, _ in runs]
    last_dedicated = max((i for i, mode in enumerate(modes) if mode == "dedicated"), default=-1)
    placer.start(dedicated=last_dedicated >= 0)
    for number, (want, names) in enumerate(runs):
        if number > last_dedicated:
            placer.crowd = None
        # Each group's missing replicas, in order, placed together.
        todo: list[str] = []
        current_group: Group | None = None
        for name, group in names:
            if group is not current_group:
                if todo and current_group is not None:
                    placer.choose(want, current_group, todo)
                todo, current_group = [], group
            if (want.deployment, want.service, name) not in kept:
                todo.append(name)
        if todo and current_group is not None:
            placer.choose(want, current_group, todo)

    # Why, against the outcome: the sentence describes the nodes as they are left.
    pending = [
        Pending(want.deployment, want.service, name, reason)
        for want, group, names in placer.unplaced
        for reason in (placer.why(want, group),)
        for name in names
    ]
    result: dict[str, list[Placement]] = {record.id: [] for record in placer.records}
    for node in placer.nodes:
        result[node.id] = node.placed
    return Plan(nodes=result, pending=pending)
