"""The views schedd hands out: agentd's assignments and the traffic of overlayd and proxyd.

This module owns what a deployment's traffic view holds (its endpoints and
the replicas in rotation this pass), and the sending of complete views to
the three view holders: when a view changed, was asked for or is due again,
the generation that stamps every view sent together, the order traffic and
assignments go in, and what a holder refused or removed. It also keeps what
overlayd and proxyd route now, which a deployment's status reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

from prometheus_client import Counter

from daemons.schedd.replicas import AGENT_TIMEOUT, ReplicaCache
from daemons.schedd.store import DesiredStore, ServiceState, StoreThread
from shared.bus import InvalidArgumentError
from shared.clients import AgentClient, OverlayClient, ProxyClient
from shared.wire import encode, replace
from shared.wire.agent import NodeAssignments, ReplicaInfo, ServiceAssignment, SyncResult
from shared.wire.traffic import (
    Backend,
    DeploymentTraffic,
    PeerBlock,
    ServiceTraffic,
    TrafficViews,
)

if TYPE_CHECKING:
    from shared.spec import DeploymentSpec

log = logging.getLogger("zlayer.schedd")

VIEWS_SENT = Counter(
    "zlayer_scheduler_views_sent",
    "Full views sent to a daemon, by result (accepted, stale: it held a newer one, failed).",
    ["daemon", "result"],
)
VIEWS_REFUSED = Counter(
    "zlayer_scheduler_views_refused",
    "Deployments whose part of a view a daemon refused (a port in use, a route clash).",
    ["daemon"],
)

RESYNC_INTERVAL = 15.0  # re-send unchanged full views, in case a receiver lost them
TRAFFIC_TIMEOUT = 5.0
VIEW_HOLDERS = ("overlayd", "proxyd", "agentd")  # traffic first: out of rotation, then stopped
IN_ROTATION = ("healthy", "none")

GENERATION_BLOCK = 1000  # generations reserved in the store at once

Assignments = dict[tuple[str, str], ServiceAssignment]


class Generations:
    """The generations stamped on views: each above every one handed out before, by this
    schedd or an earlier one on this store.

    A block of GENERATION_BLOCK is reserved in the store (durably) before any of it is
    handed out, so a view costs no store write (an fsync, tens of ms on a busy disk)
    until the block is used up; a restarted schedd starts above the stored block.
    """

    def __init__(self, store: DesiredStore, io: StoreThread) -> None:
        self.store = store
        self.io = io  # where the store's calls run
        self.value = 0  # the last one handed out
        self._top = 0  # the last one reserved
        # one reservation at a time: two views sent at once (overlayd's and proxyd's)
        # would otherwise each reserve a block, and the one finishing last could hand
        # out a generation below the other's
        self._lock = asyncio.Lock()

    async def next(self, above: int = 0) -> int:
        """A new generation, above the last one and above ``above``."""
        async with self._lock:
            wanted = max(self.value, above) + 1
            if wanted > self._top:
                wanted, self._top = await self.io.call(self._reserve, wanted)
            self.value = wanted
            return wanted

    def _reserve(self, wanted: int) -> tuple[int, int]:
        """Blocking: (the first generation of a new block, its last), stored first."""
        first = max(self.store.generation() + 1, wanted)
        top = self.store.next_generation(first + GENERATION_BLOCK - 2)
        return max(first, top - GENERATION_BLOCK + 1), top


def stays(desired: Assignments, replica: ReplicaInfo) -> bool:
    """Whether this pass keeps ``replica`` assigned (one it drops leaves rotation first)."""
    assignment = desired.get((replica.deployment, replica.service))
    if assignment is None:
        return False
    allowed = {old.revision: old.replicas for old in assignment.previous}
    allowed[assignment.revision] = assignment.replicas
    if assignment.instances and replica.instance not in assignment.instances:
        return False  # placed on another node now
    return replica.instance <= allowed.get(replica.revision, 0)


def owned_first(local: list[ReplicaInfo], desired: Assignments) -> Assignments:
    """In a cluster: while this node runs a replica whose instance is no longer placed
    here, the assignments without anything new (each keeps only the instances it runs),
    so agentd stops what the node no longer owns before it starts anything; ``desired``
    itself once nothing of that kind runs."""

    def owned(replica: ReplicaInfo) -> bool:
        assignment = desired.get((replica.deployment, replica.service))
        if assignment is None:
            return False
        return not assignment.instances or replica.instance in assignment.instances

    services = [r for r in local if r.rtype == "service"]
    if all(owned(r) for r in services):
        return desired
    running: dict[tuple[str, str], set[int]] = {}
    for replica in services:
        running.setdefault((replica.deployment, replica.service), set()).add(replica.instance)
    first: Assignments = {}
    for key, assignment in desired.items():
        if not assignment.instances:
            first[key] = assignment
            continue
        kept = [i for i in assignment.instances if i in running.get(key, set())]
        if kept:
            first[key] = replace(assignment, instances=kept)
    return first


def deployment_traffic(
    name: str,
    spec: DeploymentSpec,
    states: dict[str, ServiceState],
    replicas: list[ReplicaInfo],
    draining_now: dict[tuple[str, str], tuple[set[str], float]],
    desired: Assignments,
    elsewhere: Container[tuple[str, str]] = (),
) -> DeploymentTraffic:
    """Every service's endpoints and the replicas that may take traffic now.

    ``elsewhere`` names replicas other nodes of a cluster run (in ``replicas``, as
    those nodes published them), as (node, replica id): their own node decides
    whether they stay. By node too: a replica moving between nodes has one id on
    both, and this node's leaving copy must not pass for the other's."""
    services = []
    for svc_name, svc in spec.services.items():
        if svc.rtype != "service":
            continue
        state = states.get(svc_name)
        revisions = {state.serving, state.target} if state else set()
        # Only a running rollout drains: a cancelled one leaves no replica out.
        draining = (
            draining_now.get((name, svc_name), (set(), 0.0))[0]
            if state is not None and state.rollout == "running"
            else set()
        )
        backends = [
            Backend(replica=r.id, instance=r.instance, revision=r.revision, address=r.address)
            for r in sorted(replicas, key=lambda r: (r.revision, r.instance))
            if r.service == svc_name
            and r.rtype == "service"
            and r.state == "running"
            and r.health in IN_ROTATION
            and r.address
            and r.revision in revisions
            and r.id not in draining
            and ((r.node, r.id) in elsewhere or stays(desired, r))
        ]
        interval = svc.health.interval.total_seconds() if svc.health.interval else 0.0
        services.append(
            ServiceTraffic(
                deployment=name,
                service=svc_name,
                endpoints=[
                    e.model_dump(mode="json", by_alias=True, exclude_none=True)
                    for e in svc.endpoints
                ],
                backends=backends,
                health_interval=interval,
            )
        )
    return DeploymentTraffic(deployment=name, services=services)


class ViewSync:
    """Complete views to agentd, overlayd and proxyd, and what each took of them."""

    def __init__(
        self,
        store: DesiredStore,
        io: StoreThread,
        agent: AgentClient,
        overlay: OverlayClient,
        proxyd: ProxyClient,
        replica_cache: ReplicaCache,
        event: Callable[..., None],
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.io = io  # where the store's calls run
        self.agent = agent
        self.overlay = overlay
        self.proxyd = proxyd
        self.replica_cache = replica_cache
        self.event = event
        self.wake = wake
        # Per view holder: the last view sent (without its generation), and when.
        self._sent: dict[str, tuple[str, float]] = {}
        # The assignments agentd last took, by (deployment, service).
        self._taken: dict[tuple[str, str], ServiceAssignment] = {}
        self._resync: set[str] = set(VIEW_HOLDERS)  # holders owed a full view now
        self._generations = Generations(store, io)
        self._generation = 0
        # Per traffic holder: deployment -> why it refused that deployment's view.
        self._refused: dict[str, dict[str, str]] = {}
        self._unreachable: set[str] = set()  # holders whose last send failed, logged once
        self._held_back = False  # views held back after the store was rebuilt empty
        # deployment -> replica ids both overlayd and proxyd route to, as they last took it
        self._routed: dict[str, set[str]] = {}

    def resync(self, daemon: str) -> None:
        """``daemon`` (or every holder, for "") started: send it the complete view now."""
        if daemon and daemon not in VIEW_HOLDERS:
            raise InvalidArgumentError(
                f"{daemon} holds no view; the daemons that do: {', '.join(VIEW_HOLDERS)}"
            )
        self._resync.update([daemon] if daemon else VIEW_HOLDERS)
        if daemon == "overlayd":
            # agentd releases the networks it could not while overlayd was away (stopped
            # replicas' attachments) when it takes a view: now, not at the periodic resync
            self._resync.add("agentd")
        if daemon in ("agentd", ""):
            self.replica_cache.invalidate("resync")
        self.wake()

    def forget(self, name: str) -> None:
        """A removed deployment: no refusal of it is kept."""
        for refusals in self._refused.values():
            refusals.pop(name, None)

    def unrouted(
        self, name: str, spec: DeploymentSpec, replicas: list[ReplicaInfo], desired: Assignments
    ) -> bool:
        """Whether a replica in rotation is not yet in the traffic the daemons hold."""
        routed = self._routed.get(name, set())
        with_endpoints = {n for n, svc in spec.services.items() if svc.endpoints}
        return any(
            r.id not in routed
            for r in replicas
            if r.service in with_endpoints
            and r.rtype == "service"
            and r.state == "running"
            and r.health in IN_ROTATION
            and r.address
            and stays(desired, r)
        )

    def refusal(self, name: str) -> str:
        """Why overlayd or proxyd refused this deployment's traffic, "" when neither did."""
        for daemon in ("overlayd", "proxyd"):
            sentence = self._refused.get(daemon, {}).get(name)
            if sentence:
                return f"zlayer-{daemon} refused its traffic: {sentence}"
        return ""

    async def sync(
        self,
        traffic: list[DeploymentTraffic],
        desired: Assignments,
        peers: list[PeerBlock] | None = None,
    ) -> None:
        """Send each view holder its complete view when it changed, was asked for, or is due.

        One generation stamps every view sent together; it only grows, so a
        holder never takes a view computed before one it already has.
        """
        if self.store.recovered and not await self.io.call(self.store.names):
            # An empty store after an unreadable one is not "run nothing": leave
            # what runs alone until the user deploys again.
            if not self._held_back:
                self._held_back = True
                log.warning(
                    "the store was unreadable and starts empty: the replicas on this node "
                    "keep running, unmanaged, until their deployments are deployed again "
                    "(`zlayerctl up` each one)"
                )
            return
        assignments = sorted(desired.values(), key=lambda a: (a.deployment, a.service))
        peers = peers or []
        bodies = {"overlayd": encode(traffic), "proxyd": "", "agentd": encode(assignments)}
        bodies["proxyd"] = bodies["overlayd"]
        if peers:  # in a cluster, overlayd's view also routes the other nodes' blocks
            bodies["overlayd"] += encode(peers)
        now = time.monotonic()
        due = [
            daemon
            for daemon in VIEW_HOLDERS
            if daemon in self._resync
            or self._sent.get(daemon, ("", 0.0))[0] != bodies[daemon]
            or now - self._sent[daemon][1] >= RESYNC_INTERVAL
        ]
        if not due:
            return
        if self._generation == 0 or any(self._sent.get(d, ("", 0.0))[0] != bodies[d] for d in due):
            self._generation = await self._generations.next()

        async def send(daemon: str) -> None:
            view: NodeAssignments | TrafficViews
            if daemon == "agentd":
                view = NodeAssignments(generation=self._generation, assignments=assignments)
            else:
                view = TrafficViews(
                    generation=self._generation,
                    deployments=traffic,
                    peers=peers if daemon == "overlayd" else [],
                )
            result = await self._send_view(daemon, view)
            if result is None:
                return
            if not result.accepted:
                # It holds a newer generation (this store is older than its cache):
                # move past it and send again at once.
                VIEWS_SENT.labels(daemon, "stale").inc()
                self._generation = await self._generations.next(result.generation)
                self._resync.add(daemon)
                self.wake()
                return
            VIEWS_SENT.labels(daemon, "accepted").inc()
            self._sent[daemon] = (bodies[daemon], now)
            if daemon == "agentd":
                self._taken = {(a.deployment, a.service): a for a in assignments}
            self._resync.discard(daemon)
            await self._take_result(daemon, result)

        # Traffic before assignments, so a replica leaves rotation before it is
        # stopped. When agentd is only to start more, it goes first: the networks
        # of its new replicas then come before the traffic in overlayd's queue.
        traffic_due = [d for d in due if d != "agentd"]
        if "agentd" in due and self._only_more(assignments):
            await send("agentd")
            await asyncio.gather(*(send(d) for d in traffic_due))
        else:
            await asyncio.gather(*(send(d) for d in traffic_due))
            if "agentd" in due:
                await send("agentd")
        if all(self._sent.get(d, ("", 0.0))[0] == bodies[d] for d in ("overlayd", "proxyd")):
            self._routed = {
                view.deployment: {b.replica for svc in view.services for b in svc.backends}
                for view in traffic
            }

    def _only_more(self, assignments: list[ServiceAssignment]) -> bool:
        """Whether agentd, taking ``assignments``, stops nothing it runs for the last ones
        it took: each is still there, as it was or with more replicas of its revision."""
        named = {(a.deployment, a.service): a for a in assignments}
        for key, taken in self._taken.items():
            now = named.get(key)
            if now is None:
                return False
            if now != taken and (
                now.replicas < taken.replicas or now != replace(taken, replicas=now.replicas)
            ):
                return False
        return True

    async def _send_view(
        self, daemon: str, view: NodeAssignments | TrafficViews
    ) -> SyncResult | None:
        try:
            if isinstance(view, NodeAssignments):
                result = await asyncio.wait_for(self.agent.sync_assignments(view), AGENT_TIMEOUT)
            else:
                holder = self.overlay if daemon == "overlayd" else self.proxyd
                result = await asyncio.wait_for(holder.sync_traffic(view), TRAFFIC_TIMEOUT)
        except Exception as exc:  # not running, or restarting: owed a full view when it is back
            VIEWS_SENT.labels(daemon, "failed").inc()
            self._resync.add(daemon)
            if daemon == "agentd":
                self.replica_cache.invalidate("agentd-unreachable")
            if daemon not in self._unreachable:
                log.warning("cannot send zlayer-%s its view: %s", daemon, exc)
                self._unreachable.add(daemon)
            return None
        self._unreachable.discard(daemon)
        return result

    async def _take_result(self, daemon: str, result: SyncResult) -> None:
        """Events for what a holder refused or removed; refusals show in the status."""
        held = self._refused.setdefault(daemon, {})
        for deployment, sentence in result.refusals.items():
            if held.get(deployment) != sentence:
                VIEWS_REFUSED.labels(daemon).inc()
                self.event(
                    deployment,
                    "traffic-refused",
                    f"zlayer-{daemon} refused the traffic of {deployment}: {sentence}",
                )
        for deployment in [d for d in held if d not in result.refusals]:
            log.info("zlayer-%s now takes the traffic of %s", daemon, deployment)
        self._refused[daemon] = dict(result.refusals)
        for deployment, sentence in result.removed:
            if deployment and await self.io.call(self.store.get, deployment) is not None:
                self.event(deployment, "garbage", sentence)
            else:
                log.info("zlayer-%s: %s", daemon, sentence)
