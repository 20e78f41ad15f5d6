"""Replicas across a cluster: the leader places them, every node runs its own share.

- **Placing** (the leading node only): a pass reads every deployment's wanted
  replicas from the desired state (:func:`wanted`), the live nodes and the
  placements in force, runs :func:`~daemons.schedd.placement.place` and writes
  one :class:`NodePlacements` per node under ``KEYS["assignments"]``, all
  with one new generation, in one etcd transaction that holds only while this
  node still holds the election key it won (its create revision): a deposed
  leader's write fails. A pass runs when the desired state or the node set
  changes (:meth:`ClusterPlacement.kick`) and every :data:`PLACE_INTERVAL`.
  Nothing is written when the placement is what is in force.
- **Running** (every node): the node watches its own ``NodePlacements`` and
  the reconcile loop runs only the instance numbers placed there
  (:meth:`ClusterPlacement.instances`). A document of a lower generation than
  the one held is ignored; until the first one is read the node sends agentd
  nothing, so a node that comes back neither starts nor keeps anything
  before it knows what it owns.
- **Draining** (``node drain``): a replica on a draining node is placed again
  on a ready node, and stays placed on the draining node too
  (:class:`Handover`) until its new copy has been published healthy for
  :data:`HANDOVER_SETTLE` seconds and every live node's proxyd routes it
  (each node publishes the backends its proxyd routes, ``KEYS["routed"]``);
  only then does the draining node's document lose it. A replica that fits
  nowhere else stays where it is.
- **Leaving**: a replica taken off this node while it is in the cluster is
  unpublished first (every other node's proxyd drops it), kept running for
  :data:`LEAVE_DRAIN` seconds (as a rollout drains an old replica), then
  stopped. A node cut off from etcd for longer than its lease
  (:attr:`Membership.fenced`) owns nothing and stops its replicas through
  agentd at once (its reconcile pass cannot read the desired state then); back
  in the cluster it takes only a document of a newer generation than it held.
- **Status**: each node publishes its replicas (``KEYS["replicas"]``, bound
  to its lease, so they go with it) and reads every other node's, which the
  traffic views carry as backends at their own addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import aetcd  # type: ignore[import-untyped]

from daemons.schedd.membership import ETCD_ERRORS
from daemons.schedd.placement import Demand, Pending, Plan, demand, place
from daemons.schedd.status import desired_replicas
from shared.tasks import cancel_all
from shared.wire import WireError, decode, encode, replace
from shared.wire.agent import ReplicaInfo
from shared.wire.cluster import KEYS, NodePlacements, NodeRecord, NodeRoutes, Placement
from shared.wire.traffic import PeerBlock

if TYPE_CHECKING:
    from daemons.schedd.membership import Membership
    from daemons.schedd.store import DesiredStore
    from shared.spec import DeploymentSpec

log = logging.getLogger("zlayer.schedd.placement")

PLACE_INTERVAL = 2.0  # seconds: the leader places again at least this often
RETRY = 0.5  # seconds before a broken watch is made again
CHECK = 0.25  # seconds: how often the leader looks whether the node set changed
HOLDING_INTERVAL = 0.5  # seconds: the leader places this often while a handover waits
HANDOVER_SETTLE = 2.0  # seconds a moved replica is healthy before its old copy leaves
LEAVE_DRAIN = 2.0  # seconds a replica leaving this node runs unpublished before it stops
# seconds agentd gives a fenced node's replicas to stop: short, as their replacements
# start elsewhere now
FENCE_GRACE = 2.0
IN_ROTATION = ("healthy", "none")
ROUTES_INTERVAL = 0.5  # seconds between two looks at what this node's proxyd routes


class NotLeaderError(RuntimeError):
    """This node does not hold the election key (any more): its placement is not written."""


def instance_of(replica: str) -> int:
    """The instance number of a placed replica's name ("app-web-3" -> 3)."""
    return int(replica.rsplit("-", 1)[1])


def wanted(
    store: DesiredStore, spec_of: Callable[[str, int], DeploymentSpec | None]
) -> list[Demand]:
    """Blocking: what every deployment wants placed, from the desired state: each running
    service's replicas at its target revision (stopped, removing and job services: none)."""
    wants: list[Demand] = []
    for name in store.names():
        stored = store.get(name)
        if stored is None or stored.removing or stored.stopped:
            continue
        spec = spec_of(name, stored.revision)
        if spec is None:
            continue
        holds = store.scale_holds(name)
        stopped = store.stopped_services(name)
        states = store.service_states(name)
        for svc_name, svc in spec.services.items():
            if svc.rtype != "service" or svc_name in stopped:
                continue
            state = states.get(svc_name)
            adaptive = state.adaptive if state else None
            revision = stored.revision
            if state is not None:
                revision = state.serving if state.rollout == "failed" else state.target
            count = desired_replicas(svc, holds.get(svc_name), adaptive)
            wants.append(demand(name, svc_name, svc, revision, count))
    return wants


def _decode_placements(raw: bytes) -> NodePlacements | None:
    try:
        return decode(raw, NodePlacements)
    except WireError as exc:
        log.warning("a node's placements in etcd do not decode, skipped: %s", exc)
        return None


async def current_placements(client: Any) -> dict[str, NodePlacements]:
    """Every node's placements in force, by node id."""
    prefix = KEYS["assignments"].encode()
    found: dict[str, NodePlacements] = {}
    for kv in await client.get_prefix(prefix):
        doc = _decode_placements(kv.value)
        if doc is not None:
            found[doc.node] = doc
    return found


def _same(plan: Plan, current: Mapping[str, NodePlacements], live: Iterable[str]) -> bool:
    """Whether writing ``plan`` would change nothing a node reads."""
    ids = set(live)
    if set(current) - ids:
        return False  # a gone node's document is to be removed
    for node_id, replicas in plan.nodes.items():
        held = current.get(node_id)
        if held is None or sorted(held.replicas, key=_key) != sorted(replicas, key=_key):
            return False
    return True


def _key(placement: Placement) -> tuple[str, str, str]:
    return (placement.deployment, placement.service, placement.replica)


async def write_plan(
    client: Any,
    node_id: str,
    lease: int | None,
    plan: Plan,
    current: Mapping[str, NodePlacements],
) -> int:
    """Write ``plan`` with a generation above every one in force, as the leader
    ``node_id`` holding ``lease``; its generation. NotLeaderError when this node does
    not hold the election key, or lost it before the transaction."""
    leader_key = KEYS["leader"].encode()
    held = await client.get(leader_key)
    if held is None or held.value.decode() != node_id or lease is None or held.lease != lease:
        raise NotLeaderError(f"node {node_id} does not hold the election key")
    generation = max((doc.generation for doc in current.values()), default=0) + 1
    tx = client.transactions
    puts = [
        tx.put((KEYS["assignments"] + doc.node).encode(), encode(doc).encode())
        for doc in plan.assignments(generation)
    ]
    gone = [  # a gone node's document: it comes back owning nothing
        tx.delete((KEYS["assignments"] + node).encode())
        for node in current
        if node not in plan.nodes
    ]
    ok, _ = await client.transaction(
        # The key this node created when it won: replaced (another node won
        # meanwhile) or gone, and the write fails.
        compare=[
            tx.create(leader_key) == held.create_revision,
            tx.value(leader_key) == node_id.encode(),
        ],
        success=[*puts, *gone],
        failure=[],
    )
    if not ok:
        raise NotLeaderError(f"node {node_id} lost the election key before writing")
    return generation


async def in_rotation(client: Any) -> dict[tuple[str, str, str, int, int], str]:
    """The replicas every node published running and in rotation, as (node, deployment,
    service, instance, revision), with their addresses."""
    found: dict[tuple[str, str, str, int, int], str] = {}
    prefix = KEYS["replicas"]
    for kv in await client.get_prefix(prefix.encode()):
        info = _replica(kv.value)
        if info is None or info.state != "running" or info.health not in IN_ROTATION:
            continue
        if not info.address:
            continue
        node = kv.key.decode()[len(prefix) :].split("/", 1)[0]
        found[(node, info.deployment, info.service, info.instance, info.revision)] = info.address
    return found


async def routed(client: Any) -> dict[str, dict[str, list[str]]]:
    """What each node's proxyd routes, as it published it: node -> "deployment/service" ->
    backend addresses."""
    found: dict[str, dict[str, list[str]]] = {}
    for kv in await client.get_prefix(KEYS["routed"].encode()):
        try:
            doc = decode(kv.value, NodeRoutes)
        except WireError:
            continue
        found[doc.node] = doc.routes
    return found


class Handover:
    """Replicas leaving a draining node by rollout: each stays placed on the draining
    node until its new copy has been in rotation for ``settle`` seconds."""

    def __init__(self, settle: float = HANDOVER_SETTLE) -> None:
        self.settle = settle
        self.holding = 0  # old copies the last pass kept on draining nodes
        # (node, deployment, service, instance, revision) of a new copy -> seen in rotation since
        self._since: dict[tuple[str, str, str, int, int], float] = {}

    async def hold(
        self,
        client: Any,
        plan: Plan,
        current: Mapping[str, NodePlacements],
        nodes: Mapping[str, NodeRecord],
    ) -> int:
        """Put back into ``plan`` the draining nodes' replicas whose new copies are not yet
        settled in rotation (or that fit nowhere else); how many."""
        leaving = [
            (node, placement)
            for node, record in nodes.items()
            if record.state == "draining" and node in current
            for placement in current[node].replicas
        ]
        self.holding = 0
        if not leaving:
            self._since.clear()
            return 0
        where = {_key(p): (node, p) for node, placed in plan.nodes.items() for p in placed}
        pending = {(p.deployment, p.service, p.replica) for p in plan.pending}
        serving = await in_rotation(client)
        routers = [routes for node, routes in (await routed(client)).items() if node in nodes]
        now = time.monotonic()
        seen: set[tuple[str, str, str, int, int]] = set()
        for node, old in leaving:
            found = where.get(_key(old))
            if found is None:
                if _key(old) not in pending:
                    continue  # no longer wanted: it goes
            else:
                target, new = found
                copy = (target, new.deployment, new.service, instance_of(new.replica), new.revision)
                if copy in serving:
                    seen.add(copy)
                    since = self._since.setdefault(copy, now)
                    if now - since >= self.settle and _routed_everywhere(
                        routers, f"{new.deployment}/{new.service}", serving[copy]
                    ):
                        continue  # its new copy serves everywhere: the old one may go
            plan.nodes.setdefault(node, []).append(old)
            self.holding += 1
        self._since = {copy: at for copy, at in self._since.items() if copy in seen}
        return self.holding


def _routed_everywhere(routers: list[dict[str, list[str]]], service: str, address: str) -> bool:
    """Whether every node's proxyd that routes ``service`` routes ``address`` too (a
    service without endpoints is routed nowhere: nothing to wait for)."""
    return all(address in routes.get(service, ()) for routes in routers) or not any(
        service in routes for routes in routers
    )


async def placement_pass(
    client: Any,
    node_id: str,
    lease: int | None,
    nodes: Mapping[str, NodeRecord],
    wants: list[Demand],
    handover: Handover | None = None,
) -> tuple[Plan, int | None]:
    """One leader's pass: the plan, and the generation written (None: nothing changed).
    With ``handover``, a draining node keeps each replica until its new copy serves."""
    current = await current_placements(client)
    plan = place(
        nodes.values(),
        wants,
        {node: doc.replicas for node, doc in current.items()},
    )
    if handover is not None:
        await handover.hold(client, plan, current, nodes)
    if _same(plan, current, nodes):
        return plan, None
    return plan, await write_plan(client, node_id, lease, plan, current)


class ClusterPlacement:
    """The placing, this node's own placements and the replicas' status, for the scheduler.

    ``wants`` reads the desired state (blocking, run in a thread); ``changed`` is
    called when this node's placements or another node's replicas changed;
    ``event`` gets (deployment, kind, message, service) for a pending replica.
    """

    def __init__(
        self,
        client: Any,
        membership: Membership,
        wants: Callable[[], list[Demand]],
        changed: Callable[[], None],
        event: Callable[[str, str, str, str], None],
        subnet: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.client = client
        self.membership = membership
        self.node_id = membership.record.id
        self._wants = wants
        self._changed = changed
        self._event = event
        self._subnet = subnet  # this node's replica block, as overlayd holds it
        self.owned: NodePlacements | None = None  # None until this node's are read
        self.pending: dict[tuple[str, str], list[Pending]] = {}
        self.remote: dict[str, ReplicaInfo] = {}  # key -> a replica another node runs
        self._published: dict[str, str] = {}  # replica id -> what was put
        self._published_lease: int | None = None
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.handover = Handover()
        # (deployment, service, instance) taken off this node -> when it stops (loop time);
        # kept (unpublished) until the replica is gone from agentd's list
        self.leaving: dict[tuple[str, str, int], float] = {}
        self._fenced: int | None = None  # the generation held when this node fenced itself

    # ------------------------------------------------------------ life

    def start(self) -> None:
        works = [self._watch_own, self._watch_replicas, self._lead, self._publish_routes]
        if self._subnet is not None:
            works.append(self._claim_subnet)
        for work in works:
            self._tasks.append(asyncio.create_task(work(), name=f"placement-{work.__name__}"))

    async def stop(self) -> None:
        await cancel_all(self._tasks)

    def kick(self) -> None:
        """The desired state may have changed: the leader places again now."""
        self._kick.set()

    # ------------------------------------------------------------ what this node runs

    @property
    def known(self) -> bool:
        return self.owned is not None

    def instances(self, deployment: str, service: str) -> list[int]:
        """The instance numbers of a service placed on this node (empty: none), with those
        leaving it, which run until their drain is over."""
        if self.owned is None:
            return []
        placed = {
            instance_of(p.replica)
            for p in self.owned.replicas
            if p.deployment == deployment and p.service == service
        }
        return sorted(placed | self._leaving_of(deployment, service))

    def _leaving_of(self, deployment: str, service: str) -> set[int]:
        now = asyncio.get_running_loop().time()
        return {
            instance
            for (d, s, instance), until in self.leaving.items()
            if d == deployment and s == service and until > now
        }

    def _note_leaving(self, held: NodePlacements | None, doc: NodePlacements) -> None:
        """Replicas ``doc`` moves off this node leave by draining: unpublished at once,
        stopped after LEAVE_DRAIN. Not while fenced, nor at the first read."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        kept = {(p.deployment, p.service, instance_of(p.replica)) for p in doc.replicas}
        for key in kept:
            self.leaving.pop(key, None)  # placed here again
        if held is None or self._fenced is not None or self.membership.lease is None:
            return
        gone = {(p.deployment, p.service, instance_of(p.replica)) for p in held.replicas} - kept
        # Only a move: another node serves the same replica now. One scaled away or of a
        # removed deployment stays published until it is gone, as `down` waits for that.
        gone &= {
            (r.deployment, r.service, r.instance)
            for r in self.remote.values()
            if r.state == "running" and r.health in IN_ROTATION
        }
        if not gone:
            return
        until = now + LEAVE_DRAIN
        for key in gone:
            self.leaving[key] = until
        # the reconcile pass that stops them, once their drain is over
        loop.call_at(until + 0.05, self._changed)

    def take(self, doc: NodePlacements | None) -> bool:
        """This node's placements as read (None: the key is gone, so it owns nothing);
        whether they replace what it held (an older generation does not; after a fence,
        only a newer one or one that owns nothing does)."""
        held = self.owned
        if doc is None:
            doc = NodePlacements(node=self.node_id, generation=held.generation if held else 0)
        elif self._fenced is not None and doc.replicas and doc.generation <= self._fenced:
            log.info(
                "placements of generation %d are from before this node was cut off; "
                "it waits for a newer one",
                doc.generation,
            )
            return False
        elif held is not None and doc.generation < held.generation:
            log.warning(
                "placements of generation %d are older than the %d held; ignored",
                doc.generation,
                held.generation,
            )
            return False
        if self._fenced is not None and (not doc.replicas or doc.generation > self._fenced):
            self._fenced = None
        if doc == held:
            return False
        self._note_leaving(held, doc)
        self.owned = doc
        log.info(
            "node %s runs %d replicas as of generation %d",
            self.node_id,
            len(doc.replicas),
            doc.generation,
        )
        self._changed()
        return True

    async def _watch_own(self) -> None:
        key = (KEYS["assignments"] + self.node_id).encode()
        while True:
            try:
                # The watch starts right after this read's revision: a document written
                # in between (the first one too, none being there yet) is not missed.
                read = await self.client.get_range(key, key + b"\0")
                found = read[0] if read else None
                self.take(_decode_placements(found.value) if found is not None else None)
                watch = await self.client.watch(key, start_revision=read.header.revision + 1)
                try:
                    async for event in watch:
                        if event.kind == "DELETE":
                            self.take(None)
                        else:
                            doc = _decode_placements(event.kv.value)
                            if doc is not None:
                                self.take(doc)
                finally:
                    with contextlib.suppress(*ETCD_ERRORS):
                        await watch.cancel()
            except ETCD_ERRORS as exc:
                log.warning("watching this node's placements broke (%s); reading them again", exc)
            await asyncio.sleep(RETRY)

    # ------------------------------------------------------------ placing

    async def _lead(self) -> None:
        loop = asyncio.get_running_loop()
        last_at = 0.0
        last_nodes: Mapping[str, NodeRecord] = {}
        while True:
            # Woken by a kick; otherwise a look every CHECK: did the node set change?
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), CHECK)
            if self.membership.fenced and self._fenced is None:
                await self.fence()
            nodes = self.membership.live()
            if not self.membership.is_leader:
                last_nodes = {}
                continue
            every = HOLDING_INTERVAL if self.handover.holding else PLACE_INTERVAL
            due = loop.time() - last_at >= every
            if not (self._kick.is_set() or nodes != last_nodes or due):
                continue
            self._kick.clear()
            last_at, last_nodes = loop.time(), nodes
            try:
                await self.place_once()
            except NotLeaderError as exc:
                log.info("%s; not placing", exc)
            except ETCD_ERRORS as exc:
                log.warning("a placement pass failed (%s); trying again", exc)
            except Exception:
                log.exception("a placement pass failed; trying again")

    async def place_once(self) -> int | None:
        """One placement pass as the leader; the generation written (None: unchanged)."""
        wants = await asyncio.to_thread(self._wants)
        plan, generation = await placement_pass(
            self.client,
            self.node_id,
            self.membership.lease,
            self.membership.live(),
            wants,
            self.handover,
        )
        self._note_pending(plan.pending)
        return generation

    async def fence(self, agent: Any = None) -> None:
        """Cut off from etcd for longer than the lease: the leader has placed this node's
        replicas elsewhere. It owns nothing until a newer placement comes, and its service
        replicas stop now, through agentd (the reconcile pass needs etcd to read the
        desired state, so it cannot do it)."""
        held = self.owned
        self._fenced = held.generation if held is not None else 0
        self.owned = NodePlacements(node=self.node_id, generation=self._fenced)
        self.leaving.clear()
        self._changed()
        try:
            if agent is None:
                import sdbus

                from shared.clients import AgentClient

                agent = AgentClient(sdbus.get_default_bus())
            replicas = await asyncio.wait_for(agent.list_replicas(), FENCE_GRACE)
            services = sorted({(r.deployment, r.service) for r in replicas if r.rtype == "service"})
            await asyncio.wait_for(
                asyncio.gather(
                    *(agent.remove_service(d, s, FENCE_GRACE, False) for d, s in services)
                ),
                FENCE_GRACE * 5,
            )
        except Exception as exc:  # agentd away: the reconcile pass stops them once it can
            log.warning(
                "node %s could not stop its replicas after losing etcd: %s", self.node_id, exc
            )
            return
        log.warning(
            "node %s stopped its %d services' replicas: it lost the cluster's store",
            self.node_id,
            len(services),
        )

    def _note_pending(self, pending: list[Pending]) -> None:
        by_service: dict[tuple[str, str], list[Pending]] = {}
        for item in pending:
            by_service.setdefault((item.deployment, item.service), []).append(item)
        for key, items in by_service.items():
            before = self.pending.get(key)
            if before is None or [p.reason for p in before] != [p.reason for p in items]:
                count = len(items)
                self._event(
                    key[0],
                    "pending",
                    f"{count} replica{'s' if count != 1 else ''} of {key[1]} pending: "
                    f"{items[0].reason}",
                    key[1],
                )
        self.pending = by_service

    def pending_reason(self, deployment: str, service: str) -> str:
        """One sentence for ``ps`` when replicas of the service fit nowhere, else ""."""
        items = self.pending.get((deployment, service))
        if not items:
            return ""
        count = len(items)
        return f"{count} replica{'s' if count != 1 else ''} pending: {items[0].reason}"

    # ------------------------------------------------------------ replicas' status

    async def publish(self, replicas: list[ReplicaInfo]) -> None:
        """Put this node's replicas (the changed ones) under its lease; delete the gone.
        etcd away: tried again at the next pass."""
        try:
            await self._publish(replicas)
        except ETCD_ERRORS as exc:
            log.warning("publishing this node's replicas failed (%s); trying again", exc)

    async def _publish(self, replicas: list[ReplicaInfo]) -> None:
        lease = self.membership.lease
        if lease is None:
            return
        if lease != self._published_lease:
            self._published, self._published_lease = {}, lease
        prefix = KEYS["replicas"] + self.node_id + "/"
        tx = self.client.transactions
        # A leaving replica is unpublished first, so every node's proxyd drops it before it
        # stops, and stays so while it stops; its entry goes once agentd no longer lists it.
        here = {(r.deployment, r.service, r.instance) for r in replicas}
        at = asyncio.get_running_loop().time()
        self.leaving = {k: t for k, t in self.leaving.items() if t > at or k in here}
        now = {
            r.id: encode(replace(r, node=self.node_id))
            for r in replicas
            if (r.deployment, r.service, r.instance) not in self.leaving
        }
        ops = [
            tx.put((prefix + rid).encode(), body.encode(), lease=lease)
            for rid, body in now.items()
            if self._published.get(rid) != body
        ]
        ops += [tx.delete((prefix + rid).encode()) for rid in self._published if rid not in now]
        if not ops:
            return
        await self.client.transaction(compare=[], success=ops, failure=[])
        self._published = now

    async def _publish_routes(self) -> None:
        """Publish the backends this node's proxyd routes (under its lease) whenever they
        change, for the leader's handovers."""
        import sdbus

        from shared.clients import ProxyClient

        proxyd: ProxyClient | None = None
        key = (KEYS["routed"] + self.node_id).encode()
        sent: tuple[int, NodeRoutes] | None = None
        while True:
            await asyncio.sleep(ROUTES_INTERVAL)
            lease = self.membership.lease
            if lease is None:
                continue
            try:
                if proxyd is None:  # the daemon's bus (shared.daemon makes it the default)
                    proxyd = ProxyClient(sdbus.get_default_bus())
                infos = await asyncio.wait_for(proxyd.list_routes(), ROUTES_INTERVAL * 10)
            except Exception as exc:  # proxyd not up yet, or restarting: asked again
                log.debug("no routes from zlayer-proxyd yet: %s", exc)
                continue
            routes: dict[str, set[str]] = {}
            for info in infos:
                addresses = {b.rsplit(":", 1)[0].strip("[]") for b in info.backends}
                routes.setdefault(f"{info.deployment}/{info.service}", set()).update(addresses)
            doc = NodeRoutes(
                node=self.node_id, routes={k: sorted(v) for k, v in sorted(routes.items())}
            )
            if sent == (lease, doc):
                continue
            try:
                await self.client.put(key, encode(doc).encode(), lease=lease)
            except ETCD_ERRORS as exc:
                log.warning("publishing this node's routes failed (%s); trying again", exc)
                continue
            sent = (lease, doc)

    async def _watch_replicas(self) -> None:
        prefix = KEYS["replicas"].encode()
        own = (KEYS["replicas"] + self.node_id + "/").encode()
        while True:
            try:
                listed = await self.client.get_prefix(prefix)
                found: dict[str, ReplicaInfo] = {}
                for kv in listed:
                    if not kv.key.startswith(own):
                        info = _replica(kv.value)
                        if info is not None:
                            found[kv.key.decode()] = info
                self.remote = found
                self._changed()
                watch = await self.client.watch(
                    prefix,
                    range_end=aetcd.utils.prefix_range_end(prefix),
                    start_revision=listed.header.revision + 1,
                )
                try:
                    async for event in watch:
                        key = event.kv.key
                        if key.startswith(own):
                            continue
                        if event.kind == "DELETE":
                            self.remote.pop(key.decode(), None)
                        else:
                            info = _replica(event.kv.value)
                            if info is None:
                                continue
                            self.remote[key.decode()] = info
                        self._changed()
                finally:
                    with contextlib.suppress(*ETCD_ERRORS):
                        await watch.cancel()
            except ETCD_ERRORS as exc:
                log.warning("watching the cluster's replicas broke (%s); reading them again", exc)
            await asyncio.sleep(RETRY)

    # ------------------------------------------------------------ addresses

    async def _claim_subnet(self) -> None:
        """Claim this node's block in etcd (``KEYS["subnets"]``, one transaction: free or
        already this node's) and put it in the node's record, for the others' routes."""
        assert self._subnet is not None
        given = self.membership.record.subnet  # the block init or join took, if any
        while True:
            try:
                block = await self._subnet()
                if given and block != given:
                    # overlayd has not moved to it yet (restarting): its old subnet is
                    # no block of this node's, so it is never claimed
                    log.info("zlayer-overlayd is on %s, not yet on block %s", block, given)
                elif await claim_subnet(self.client, self.node_id, block):
                    record = self.membership.record
                    if record.subnet != block:
                        await self.membership.update(replace(record, subnet=block))
                    log.info("node %s routes its replicas' block %s", self.node_id, block)
                    return
                else:
                    log.error(
                        "the replicas' block %s of node %s is another node's; give this "
                        "node's zlayer-overlayd another subnet",
                        block,
                        self.node_id,
                    )
                    return
            except ETCD_ERRORS as exc:
                log.warning("cannot claim this node's block yet (%s)", exc)
            except Exception as exc:  # overlayd not up yet: asked again
                log.debug("no subnet from zlayer-overlayd yet: %s", exc)
            await asyncio.sleep(2.0)

    def peers(self) -> list[PeerBlock]:
        """The other live nodes' blocks and addresses, for overlayd's routes; through the
        mesh (see :func:`peer_block`) where this node and the other have keys."""
        own = self.membership.record
        return [
            peer_block(own, r)
            for r in sorted(self.membership.live().values(), key=lambda r: r.id)
            if r.id != self.node_id and r.subnet
        ]

    def remote_replicas(self, deployment: str) -> list[ReplicaInfo]:
        """Other nodes' replicas of ``deployment``, as they published them."""
        return [r for r in self.remote.values() if r.deployment == deployment]

    def node_of(self, key: str) -> str:
        """The node of a replica key (``/zlayer/replicas/<node>/<id>``)."""
        return key[len(KEYS["replicas"]) :].split("/", 1)[0]


def peer_block(own: NodeRecord, other: NodeRecord) -> PeerBlock:
    """How this node (``own``) reaches ``other``'s block: through the mesh when both
    have a key (a node whose mesh is off, or not up yet, keeps the plain route), at its
    advertised address and mesh port unless it is behind NAT (then overlayd learns its
    endpoint from its handshakes), with the longer of the two keepalives."""
    if not (own.wireguard_key and other.wireguard_key):
        return PeerBlock(node=other.id, subnet=other.subnet, address=other.address)
    endpoint = ""
    if other.reachable and other.mesh_port:
        host = f"[{other.address}]" if ":" in other.address else other.address
        endpoint = f"{host}:{other.mesh_port}"
    return PeerBlock(
        node=other.id,
        subnet=other.subnet,
        address=other.address,
        wireguard_key=other.wireguard_key,
        endpoint=endpoint,
        keepalive=max(own.mesh_keepalive, other.mesh_keepalive),
    )


async def claim_subnet(client: Any, node_id: str, block: str) -> bool:
    """Whether ``block`` is ``node_id``'s in etcd now: claimed while free, or already its."""
    key = (KEYS["subnets"] + block).encode()
    tx = client.transactions
    ok, responses = await client.transaction(
        compare=[tx.create(key) == 0],
        success=[tx.put(key, node_id.encode())],
        failure=[tx.get(key)],
    )
    if ok:
        return True
    found = responses[0]
    return bool(found) and found[0][0].decode() == node_id


def _replica(raw: bytes) -> ReplicaInfo | None:
    try:
        return decode(raw, ReplicaInfo)
    except WireError:
        return None
