"""The reconcile loop: from the stored desired state to ``ApplyService`` calls on agentd.

schedd decides *what* should run (which revision, how many replicas of each
service, in which order given ``depends``, when a cron job fires); agentd
makes this node match and reports replicas back. The loop is level-driven:
every pass reads the store afresh, and agentd's replicas from a copy its
signals keep current (:mod:`daemons.schedd.replicas`, read in full again
when agentd restarts), so a restarted schedd (or agentd) converges again
without remembering anything in memory but timers.

This module owns the loop and the requests that feed it: deploy, plan and
rollback (parsed, checked for public ports another deployment holds, stored
as a revision), the intents ``down``, ``stop`` and ``scale`` that the loop
carries out, the pass itself (each deployment's assignments in ``depends``
order, removals, cron and deploy-time jobs, autoscaling), the waits of
the Deploy, Down, Stop and Scale jobs (woken after each pass and with each replica
signal), and the replica metrics. What a deployment's status shows is
:mod:`daemons.schedd.status`, a revision's rollout :mod:`daemons.schedd.rollouts`,
and the views sent to agentd, overlayd and proxyd :mod:`daemons.schedd.views`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from prometheus_client import Counter, Gauge, Histogram
from sdbus import SdBus

from daemons.schedd.autoscale import Load, Sampler, decide, replica_load
from daemons.schedd.replicas import AGENT_TIMEOUT, ReplicaCache, agent_call
from daemons.schedd.rollouts import Rollouts
from daemons.schedd.secrets import Secrets, SecretUnreadableError, info, missing, spec_references
from daemons.schedd.status import deployment_status, desired_replicas, start_order
from daemons.schedd.store import DesiredStore, ServiceState, StoredDeployment, StoreThread
from daemons.schedd.views import (
    IN_ROTATION,
    TRAFFIC_TIMEOUT,
    ViewSync,
    deployment_traffic,
    owned_first,
)
from shared.bus import (
    ConflictError,
    InvalidSpecError,
    NotFoundError,
    UnavailableError,
    ZLayerError,
)
from shared.clients import AgentClient, OverlayClient, ProxyClient
from shared.jobs import Job
from shared.wasm_limits import PREFIX as WASM_LIMIT_PREFIX
from shared.wire import encode
from shared.wire.agent import (
    JobRun,
    ReplicaInfo,
    ReplicaStats,
    RevisionReplicas,
    ServiceAssignment,
)
from shared.wire.api import SecretInfo, SecretValue
from shared.wire.scheduler import (
    CronSchedule,
    DeploymentStatus,
    DeployPlan,
    Event,
    replicas_over,
)
from shared.wire.traffic import DeploymentTraffic

if TYPE_CHECKING:
    from daemons.schedd.cluster_placement import ClusterPlacement
    from daemons.schedd.placement import Demand

    # the spec models load with the first deployment, not at start
    from shared.spec import DeploymentSpec, ServiceSpec

T = TypeVar("T")


def _no_key() -> bytes:
    raise UnavailableError("schedd was started without the node key; secrets cannot be read")


log = logging.getLogger("zlayer.schedd")

REPLICAS = Gauge(
    "zlayer_scheduler_replicas",
    "Replicas per service: desired, running, and healthy (in rotation).",
    ["deployment", "service", "kind"],
)
PASS_SECONDS = Histogram(
    "zlayer_scheduler_reconcile_seconds",
    "How long one reconcile pass over every deployment took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
PASS_ERRORS = Counter(
    "zlayer_scheduler_reconcile_errors",
    "Reconcile passes that could not finish, by reason.",
    ["reason"],
)

PASS_INTERVAL = 1.0  # seconds between reconcile passes
AUTOSCALE_INTERVAL = 5.0  # seconds between load samples
SLOW_PASS = 3.0  # a reconcile pass slower than this is logged: a neighbour is slow


def check_spec_size(spec_text: str) -> None:
    """Refuse a spec larger than MAX_SPEC_BYTES, with one sentence, before parsing it
    (a 5 MB spec once took 50 s and 1.6 GiB to parse)."""
    # shared.spec loads the spec models: called in the worker thread, not at start.
    from shared.spec.limits import MAX_SPEC_BYTES

    # A character is at most 4 bytes: most specs are decided without encoding.
    if len(spec_text) * 4 <= MAX_SPEC_BYTES:
        return
    size = len(spec_text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise InvalidSpecError(
            f"the spec is {size / (1 << 20):.1f} MiB, more than the {MAX_SPEC_BYTES >> 20} MiB "
            "schedd accepts; split it into several deployments"
        )


def _public_ports(spec: DeploymentSpec) -> dict[tuple[str, str], str]:
    """What each public endpoint claims on the node -> "service web endpoint http".

    A claim is (what it is called, the node port it is on). tcp and udp
    endpoints claim their whole port; http, https and websocket ones claim
    one route on their port (proxyd listens on each endpoint's port), which
    they share with other routes of their scheme: see :func:`_port_clash`.
    """
    claims: dict[tuple[str, str], str] = {}
    for name, service in spec.services.items():
        for endpoint in service.endpoints:
            if endpoint.expose != "public":
                continue
            where = f"service {name} endpoint {endpoint.name}"
            transport = "udp" if endpoint.protocol == "udp" else "tcp"
            port = f"{endpoint.port}/{transport}"
            if endpoint.protocol in ("tcp", "udp"):
                claims[(f"port {port}", port)] = where
            else:
                scheme = "https" if endpoint.protocol == "https" else "http"
                host = endpoint.host or "*"
                route = f"{scheme}://{host}:{endpoint.port}{endpoint.path or '/'}"
                claims[(f"route {route}", port)] = where
    return claims


def _port_clash(
    claim: tuple[str, str], taken: dict[tuple[str, str], str]
) -> tuple[str, str] | None:
    """Who in ``taken`` cannot share the node with ``claim``, and the fix; None if nobody.

    Two claims on one port clash unless both are routes of one scheme with
    different hosts or paths (an http and an https route cannot share a port,
    nor a route a tcp port).
    """
    label, port = claim
    for other, where in taken.items():
        if other[1] != port:
            continue
        if other[0] == label and label.startswith("route"):
            return where, "give it another host or path"
        routes = label.startswith("route") and other[0].startswith("route")
        if not routes or label.split(":", 1)[0] != other[0].split(":", 1)[0]:
            return (where if other[0] == label else f"{where} ({other[0]})"), "pick another port"
    return None


def next_cron_time(schedule: str, after: float) -> float:
    from croniter import croniter  # with the first cron job, not at start

    seconds_first = len(schedule.split()) > 5
    nxt: float = croniter(schedule, after, second_at_beginning=seconds_first).get_next(float)
    return nxt


def condition_met(condition: str, replicas: list[ReplicaInfo], jobs: list[JobRun]) -> bool:
    """Whether a dependency's replicas (or job runs) satisfy ``condition``."""
    if jobs and not replicas:
        latest = jobs[0]
        return latest.state == "succeeded" or (condition == "started")
    running = [r for r in replicas if r.state == "running"]
    if condition == "started":
        return bool(running)
    return bool(running) and all(r.health in ("healthy", "none") for r in running)


@dataclass(frozen=True, slots=True)
class _Reads:
    """One deployment's stored state as a pass reads it."""

    stored: StoredDeployment
    holds: dict[str, int]
    stopped: set[str]
    cron_off: set[str]
    states: dict[str, ServiceState]
    # service -> which versions of the secrets its env reads (see _secrets_digest)
    digests: dict[str, str]


def _reads_secrets(dumped: dict[str, Any]) -> bool:
    """Whether a dumped ServiceSpec's env reads a secret (``$S:``)."""
    env = dumped.get("env")
    return isinstance(env, dict) and any("$S:" in str(v) for v in env.values())


@dataclass
class _Waiting:
    since: float
    warned: bool = False


class Scheduler:
    """Desired state, decisions, and the loop that hands them to agentd."""

    cluster: Any = None  # a ClusterContext (daemons/schedd/cluster.py) in a cluster, None alone
    # In a cluster, while the loop runs: the placing, this node's share and the others' replicas.
    placement: ClusterPlacement | None = None

    def __init__(
        self,
        store: DesiredStore,
        bus: SdBus,
        emit: Callable[[Event], None],
        secrets_key: Callable[[], bytes] = _no_key,
        cluster_secrets_key: Callable[[], bytes] | None = None,
    ) -> None:
        self.store = store
        # Every call of the store runs here, off the event loop and in the loop's order.
        self.io = StoreThread()
        # Events made on the loop and not yet in the store: written together, one
        # transaction (one fsync) for all the store's thread finds waiting.
        self._unwritten_events: list[Event] = []
        self._unwritten_lock = threading.Lock()
        self.secrets = Secrets(store, secrets_key, cluster_secrets_key)
        self.bus = bus
        self.agent = AgentClient(bus)
        self.replica_cache = ReplicaCache(self.agent, self._replicas_changed)
        self.replica_cache.noted = self._replica_noted
        self.overlay = OverlayClient(bus)
        self.proxyd = ProxyClient(bus)
        self.emit_signal = emit
        self._wake = asyncio.Event()
        # Set (and replaced) whenever a deployment's status can have changed: after
        # each pass and with each replica signal. Deploy and down jobs wait on it.
        self._status_changed = asyncio.Event()
        self._deploy_lock = asyncio.Lock()  # revision numbers are handed out one at a time
        # This pass's assignments, (deployment, service) -> what agentd should run.
        self._desired: dict[tuple[str, str], ServiceAssignment] = {}
        self._stop_grace: dict[tuple[str, str], float] = {}  # `stop --timeout/--force`
        self._gone_services: set[tuple[str, str]] = set()  # services left out of the spec
        self._waiting: dict[tuple[str, int, str], _Waiting] = {}
        self._failed: dict[tuple[str, int, str], str] = {}
        self._refusals_said: dict[str, str] = {}  # replica id -> the refusal its event gave
        self._deploy_jobs_done: set[tuple[str, int, str]] = set()
        self._cron_next: dict[tuple[str, str], float] = {}
        self._previous_desired: dict[tuple[str, str], ServiceAssignment] = {}
        # This pass's stored deployments, read once (off the event loop) per pass.
        self._pass_stored: dict[str, StoredDeployment] = {}
        # Held while a secret is set or removed and its services rolled, so the
        # loop does not take the change for a roll that went missing.
        self._secrets_lock = asyncio.Lock()
        self._drifted: dict[str, set[str]] = {}  # this pass: services whose secrets changed
        self._specs: dict[tuple[str, int], DeploymentSpec] = {}
        self._sampler = Sampler()
        self._sampled_at: dict[str, float] = {}
        self._deployed_at: dict[str, float] = {}  # deployment -> its last deploy (monotonic)
        self.rollouts = Rollouts(store, self.io, self._service_spec, self.event, self._apply)
        self.views = ViewSync(
            store,
            self.io,
            self.agent,
            self.overlay,
            self.proxyd,
            self.replica_cache,
            self.event,
            self.wake,
        )

    # ------------------------------------------------------------ events

    def event(
        self, deployment: str, kind: str, message: str, service: str = "", replica: str = ""
    ) -> None:
        event = Event(
            time=time.time(),
            deployment=deployment,
            service=service,
            replica=replica,
            kind=kind,
            message=message,
        )
        log.info("%s: %s", deployment, message)
        with self._unwritten_lock:
            self._unwritten_events.append(event)
            first = len(self._unwritten_events) == 1
        if first:
            # Not waited for: the store's thread writes it, with every event made until
            # then, in one transaction, and before any later read of events.
            self.io.post(self._write_events)
        self.emit_signal(event)

    def _write_events(self) -> None:
        """In the store's thread: every event made and not yet written."""
        with self._unwritten_lock:
            events, self._unwritten_events = self._unwritten_events, []
        self.store.add_events(events)

    # ------------------------------------------------------------ requests

    async def _parse(
        self, spec_text: str, filename: str, host_env: dict[str, str]
    ) -> tuple[DeploymentSpec, list[str]]:
        """The checked spec and its warnings. Parsed in a worker thread: a large spec
        takes seconds, and the event loop must keep answering the bus and the watchdog."""
        return await asyncio.to_thread(self._parse_now, spec_text, filename, host_env)

    @staticmethod
    def _parse_now(
        spec_text: str, filename: str, host_env: dict[str, str]
    ) -> tuple[DeploymentSpec, list[str]]:
        check_spec_size(spec_text)
        from shared.spec import SpecError, parse_spec
        from shared.spec.refs import resolve_env
        from shared.spec.support import node_support

        try:
            spec = parse_spec(spec_text, filename or "<spec>")
        except SpecError as exc:
            raise InvalidSpecError("\n".join(str(i) for i in exc.issues)) from None
        problems = resolve_env(spec, host_env)
        # Each refusal and warning names the file, line and column of its key, as
        # validate does.
        support = node_support(spec, spec_text, filename or "<spec>")
        problems += support.refusals
        if problems:
            raise InvalidSpecError("\n".join(problems))
        return spec, list(support.warnings)

    async def deploy(
        self, spec_text: str, filename: str, host_env: dict[str, str]
    ) -> DeploymentStatus:
        spec, warnings = await self._parse(spec_text, filename, host_env)
        await self.io.call(self._check_deployable, spec)
        # A deploy is a fresh start for what failed: services that gave up on
        # their dependencies wait again, and failed replicas retry at once
        # (the assignment's ``retry`` changes with the revision).
        for key in [k for k in self._failed if k[0] == spec.deployment]:
            del self._failed[key]
        for waiting in [k for k in self._waiting if k[0] == spec.deployment]:
            del self._waiting[waiting]
        status = await self._store_revision(spec, spec_text, filename, "deployed")
        for text in warnings:
            self.event(spec.deployment, "warning", text)
        return status

    async def _store_revision(
        self,
        spec: DeploymentSpec,
        spec_text: str,
        filename: str,
        verb: str,
        roll: frozenset[str] = frozenset(),
    ) -> DeploymentStatus:
        """Store ``spec`` as the next revision with every service's rollout plan, in one
        transaction: a schedd killed in the middle has the old deployment or the new."""
        name = spec.deployment
        spec_json = spec.model_dump_json(by_alias=True)
        replicas: list[ReplicaInfo] = []
        if await self.io.call(self.store.get, name) is not None:
            with contextlib.suppress(UnavailableError):
                replicas = await self._replicas(name)
        async with self._deploy_lock:

            def plan() -> tuple[int, dict[str, ServiceState], list[tuple[str, str, str]]]:
                revision = self.store.next_revision(name)
                digests = {svc: self._secrets_digest(name, s) for svc, s in spec.services.items()}
                before = self.store.service_states(name)
                # A service whose secrets changed since its last roll rolls too, even
                # with the same spec.
                rolled = roll | {
                    svc for svc, d in digests.items() if svc in before and before[svc].secrets != d
                }
                states, events = self.rollouts.plan(name, spec, revision, replicas, before, rolled)
                for svc_name, state in states.items():
                    state.secrets = digests[svc_name]
                return revision, states, events

            revision, states, events = await self.io.call(plan)
            stored_as = await self.io.call(
                self.store.add_revision, name, spec_json, spec_text, filename, states
            )
            self._deployed_at[name] = time.monotonic()
            # The pass and status() take it from here, not parsed again from the store.
            self._specs[(name, stored_as)] = spec
        for svc_name, state in states.items():
            if state.rollout != "running":
                self.rollouts.draining.pop((name, svc_name), None)
        for kind, service, message in events:
            self.event(name, kind, message, service=service)
        self.event(name, "deploy", f"revision {revision} of {name} {verb}")
        self.wake()
        return await self.status(name)

    def _spec(self, name: str, revision: int) -> DeploymentSpec | None:
        """The spec of a revision, parsed once. Blocking the first time (the store's
        thread reads each revision a pass needs before the loop asks for it)."""
        from shared.spec import DeploymentSpec

        key = (name, revision)
        if key not in self._specs:
            text = self.store.revision_spec(name, revision)
            if text is None:
                return None
            self._specs[key] = DeploymentSpec.model_validate_json(text)
        return self._specs[key]

    def _service_spec(self, name: str, revision: int, service: str) -> ServiceSpec | None:
        spec = self._spec(name, revision)
        return spec.services.get(service) if spec else None

    async def rollback(self, name: str) -> int:
        """Deploy the revision before the current one again, as a new revision."""
        spec, (text, filename), previous = await self.io.call(self._rollback_source, name)
        status = await self._store_revision(
            spec, text, filename, f"rolled back to revision {previous}"
        )
        return status.revision

    def _rollback_source(self, name: str) -> tuple[DeploymentSpec, tuple[str, str], int]:
        """Blocking: the revision before ``name``'s current one, checked as a deploy is:
        its spec, its source (text, file name) and its number."""
        stored = self._require(name)
        earlier = [r for r in self.store.revisions(name) if r < stored.revision]
        if not earlier:
            anew = (
                f" (it was deployed anew at revision {stored.revision}, after `zlayerctl down`)"
                if stored.revision > 1
                else ""
            )
            raise NotFoundError(
                f"deployment {name} has no revision before {stored.revision} to roll back to" + anew
            )
        previous = earlier[-1]
        spec = self._spec(name, previous)
        source = self.store.revision_source(name, previous)
        if spec is None or source is None:  # pragma: no cover - listed above
            raise NotFoundError(f"revision {previous} of {name} is gone")
        self._check_deployable(spec)
        return spec, source, previous

    def _check_deployable(self, spec: DeploymentSpec) -> None:
        """Blocking: a conflict with another deployment's public ports, or a secret it
        reads that is not set, refused in one sentence each."""
        self._check_ports(spec)
        self._check_secrets(spec)

    def _check_ports(self, spec: DeploymentSpec) -> None:
        """Blocking: a public port belongs to one deployment on this node."""
        from shared.spec import DeploymentSpec

        mine = _public_ports(spec)
        for other in self.store.names():
            if other == spec.deployment:
                continue
            stored = self.store.get(other)
            if stored is None or stored.removing:  # its routes leave with the next view
                continue
            taken = _public_ports(DeploymentSpec.model_validate_json(stored.spec_json))
            for claim, where in mine.items():
                clash = _port_clash(claim, taken)
                if clash is not None:
                    theirs, fix = clash
                    raise ConflictError(
                        f"{where} wants public {claim[0]}, which {theirs} of deployment "
                        f"{other} already uses; {fix}, or `zlayerctl down {other}` first"
                    )

    async def plan(self, spec_text: str, filename: str, host_env: dict[str, str]) -> DeployPlan:
        from shared.spec import DeploymentSpec

        spec, _warnings = await self._parse(spec_text, filename, host_env)

        def read() -> tuple[DeploymentSpec | None, int]:
            self._check_secrets(spec)
            current = self.store.get(spec.deployment)
            old = DeploymentSpec.model_validate_json(current.spec_json) if current else None
            return old, self.store.next_revision(spec.deployment)

        old, revision = await self.io.call(read)
        actions: list[str] = []
        for name in start_order(spec):
            service = spec.services[name]
            want = desired_replicas(service, None)
            what = f"{service.rtype} {name} ({service.image.name})"
            if old is None or name not in old.services:
                verb = "create"
            elif old.services[name] == service:
                verb = "keep"
            else:
                verb = "replace"
            count = (
                f": {want} replica{'s' if want != 1 else ''}" if service.rtype == "service" else ""
            )
            after = (
                ", after " + ", ".join(f"{d.service} is {d.condition}" for d in service.depends)
                if service.depends
                else ""
            )
            actions.append(f"{verb} {what}{count}{after}")
        if old is not None:
            actions += [f"remove {name}" for name in old.services if name not in spec.services]
        return DeployPlan(deployment=spec.deployment, revision=revision, actions=actions)

    async def _stored(self, name: str, removing_ok: bool = False) -> StoredDeployment:
        """Deployment ``name`` as stored, read in the store's thread (see _require)."""
        return await self.io.call(self._require, name, removing_ok)

    async def _stored_spec(self, name: str) -> tuple[StoredDeployment, DeploymentSpec]:
        """Deployment ``name`` as stored and its current spec (parsed once, then kept),
        read in the store's thread."""

        def read() -> tuple[StoredDeployment, DeploymentSpec]:
            stored = self._require(name)
            return stored, self._current_spec(stored)

        return await self.io.call(read)

    def _current_spec(self, stored: StoredDeployment) -> DeploymentSpec:
        """The spec of ``stored``'s current revision (blocking the first time, see _spec)."""
        spec = self._spec(stored.name, stored.revision)
        if spec is None:  # pragma: no cover - a stored deployment has its revision
            raise NotFoundError(f"there is no deployment named {stored.name}")
        return spec

    def _require(self, name: str, removing_ok: bool = False) -> StoredDeployment:
        """Blocking: deployment ``name`` as stored; NotFoundError naming those there are
        when it is not (or is being removed, unless ``removing_ok``)."""
        stored = self.store.get(name)
        if stored is None:
            known = ", ".join(self.store.names()) or "none"
            raise NotFoundError(f"there is no deployment named {name} (deployments: {known})")
        if stored.removing and not removing_ok:
            raise NotFoundError(
                f"deployment {name} is being removed; `zlayerctl ps` shows its last replicas "
                "stopping, then it is gone"
            )
        return stored

    async def down(self, name: str) -> None:
        """Keep the intent to remove ``name`` and let the loop carry it out.

        The loop takes the deployment out of every traffic view first, then out
        of agentd's assignments (its replicas stop with their grace period),
        and forgets it once no replica is left. A stop of the daemons in
        between changes nothing: the intent is in the store.
        """
        stored = await self._stored(name, removing_ok=True)
        if stored.removing:
            return
        await self.io.call(self.store.set_removing, name)
        self.event(name, "removing", f"removing {name}: its replicas stop, then it is gone")
        self.wake()

    async def _finish_removal(self, name: str) -> None:
        """Every replica of a deployment being removed is gone: forget it."""
        await self.io.call(self.store.remove, name)
        for key in [k for k in self._desired if k[0] == name]:
            del self._desired[key]
        self.rollouts.forget(name)
        # list(): a copy taken at once, as the store's thread may add to it meanwhile
        for cached in [k for k in list(self._specs) if k[0] == name]:
            del self._specs[cached]
        self._deployed_at.pop(name, None)
        for table in (self._failed, self._waiting):
            for key3 in [k for k in table if k[0] == name]:
                del table[key3]
        self.views.forget(name)
        for key in [k for k in self._stop_grace if k[0] == name]:
            del self._stop_grace[key]
        self._gone_services = {k for k in self._gone_services if k[0] != name}
        self._sampler.forget(f"{name}/")
        self._forget_metrics(name)
        log.info("%s: removed", name)

    async def stop(self, name: str, service: str, timeout_sec: float, force: bool) -> None:
        """Keep a stop of ``service`` (or every service) and let the loop carry it out."""
        _, spec = await self._stored_spec(name)
        if service and service not in spec.services:
            raise NotFoundError(
                f"deployment {name} has no service {service} (services: {', '.join(spec.services)})"
            )
        await self.io.call(self.store.set_stopped, name, service, True)
        grace = 0.0 if force else timeout_sec
        for svc_name in [service] if service else list(spec.services):
            self._stop_grace[(name, svc_name)] = grace
        self.event(name, "stopped", f"stopping {service or 'every service'}", service=service)
        self.wake()

    async def scale(self, name: str, service: str, replicas: int) -> None:
        stored, spec = await self._stored_spec(name)
        if service not in spec.services:
            raise NotFoundError(
                f"deployment {name} has no service {service} (services: {', '.join(spec.services)})"
            )
        if spec.services[service].rtype != "service":
            raise InvalidSpecError(
                f"{service} is a {spec.services[service].rtype}; only services scale"
            )
        groups = spec.services[service].replica_groups
        if groups:
            # The groups' counts are the service's; a held count would not be placed.
            raise InvalidSpecError(
                f"{service}'s replicas are set by its replica_groups "
                f"({sum(g.count for g in groups)} in all); change their counts in the spec "
                "and deploy it again"
            )
        await self.io.call(self.store.hold_scale, name, service, replicas)
        if stored.stopped:
            # The whole deployment was stopped: scaling one service starts that
            # service alone, the others stay stopped.
            for other in spec.services:
                if other != service:
                    await self.io.call(self.store.set_stopped, name, other, True)
            await self.io.call(self.store.set_stopped, name, "", False)
        await self.io.call(self.store.set_stopped, name, service, False)
        self.event(
            name,
            "scaled",
            f"scaled {service} to {replicas} (held until the next deploy)",
            service=service,
        )
        self.wake()

    async def trigger_job(self, name: str, service: str, trigger: str = "manual") -> JobRun:
        stored, spec = await self._stored_spec(name)
        svc = spec.services.get(service)
        if svc is None or svc.rtype == "service":
            jobs = [n for n, s in spec.services.items() if s.rtype != "service"]
            raise NotFoundError(
                f"deployment {name} has no job or cron job named {service} "
                f"(jobs: {', '.join(jobs) or 'none'})"
            )
        await self._apply(name, stored.revision, service, svc, 0, force=True)
        run = await self._agent_call(self.agent.run_job(name, service, trigger))
        self.event(
            name, "job-started", f"{trigger} run {run.id} of {service} started", service=service
        )
        return run

    async def events(self, name: str, limit: int) -> list[Event]:
        def read() -> list[Event]:
            names = [self._require(name, removing_ok=True).name] if name else self.store.names()
            found: list[Event] = []
            for dep in names:
                found += self.store.events(dep, limit)
            return found

        # After every event posted before it: the store's thread runs calls in order.
        found = await self.io.call(read)
        return sorted(found, key=lambda e: e.time)[-limit:]

    async def cron_schedules(self, name: str) -> list[CronSchedule]:
        return await self.io.call(self._cron_rows, name)

    def _cron_rows(self, name: str) -> list[CronSchedule]:
        """Blocking: the cron services of ``name`` (every deployment for ""), one row each."""
        from shared.spec import DeploymentSpec

        names = [name] if name else self.store.names()
        rows = []
        for dep in names:
            stored = self.store.get(dep)
            if stored is None:
                continue
            spec = DeploymentSpec.model_validate_json(stored.spec_json)
            off = self.store.cron_disabled(dep)
            for svc_name, svc in spec.services.items():
                if svc.rtype == "cron" and svc.schedule:
                    rows.append(
                        CronSchedule(
                            deployment=dep,
                            service=svc_name,
                            schedule=svc.schedule,
                            next_run=None
                            if svc_name in off
                            else self._cron_next.get((dep, svc_name)),
                            last_run=self.store.last_cron_run(dep, svc_name),
                            enabled=svc_name not in off,
                        )
                    )
        return rows

    async def set_cron_enabled(self, name: str, service: str, enabled: bool) -> None:
        """Turn a cron service's schedule off or on; kept in the store across restarts."""
        _, spec = await self._stored_spec(name)
        svc = spec.services.get(service)
        if svc is None or svc.rtype != "cron":
            crons = [n for n, s in spec.services.items() if s.rtype == "cron"]
            raise NotFoundError(
                f"deployment {name} has no cron job named {service} "
                f"(cron jobs: {', '.join(crons) or 'none'})"
            )
        await self.io.call(self.store.set_cron_enabled, name, service, enabled)
        # Enabled again: the next run is counted from now, not from before it was off.
        self._cron_next.pop((name, service), None)
        if enabled:
            await self.io.call(self.store.record_cron_run, name, service, time.time())
        word = "enabled" if enabled else "disabled: it does not fire until enabled again"
        self.event(name, "cron", f"cron job {service} {word}", service=service)
        self.wake()

    # ------------------------------------------------------------ secrets

    def _check_secrets(self, spec: DeploymentSpec) -> None:
        problems = missing(spec, self.secrets)
        if problems:
            raise InvalidSpecError("\n".join(problems))

    def _with_secrets(self, name: str, svc_name: str, dumped: dict[str, Any]) -> dict[str, Any]:
        """Blocking when it reads a secret: a dumped ServiceSpec with its env's ``$S:``
        references replaced by their values."""
        if not _reads_secrets(dumped):
            return dumped
        env = dumped["env"]
        from shared.spec.refs import resolve_secrets

        lookup = self.secrets.lookup(name)
        return dumped | {
            "env": {
                key: resolve_secrets(str(value), lookup, f"services.{svc_name}.env.{key}")
                for key, value in env.items()
            }
        }

    def _users(self, secret: str, scope: str) -> dict[str, frozenset[str]]:
        """Blocking: deployment -> its services whose ``$S:secret`` reads the one of ``scope``
        (a deployment, or "" for node-wide: read where the deployment has none of its own)."""
        from shared.spec import DeploymentSpec

        users: dict[str, frozenset[str]] = {}
        for dep in [scope] if scope else self.store.names():
            stored = self.store.get(dep)
            if stored is None or stored.removing:
                continue
            if not scope and self.store.secret(secret, dep) is not None:
                continue  # its own secret of that name wins over the node-wide one
            spec = DeploymentSpec.model_validate_json(stored.spec_json)
            services = frozenset(
                svc for svc, names in spec_references(spec).items() if secret in names
            )
            if services:
                users[dep] = services
        return users

    async def _roll(self, users: dict[str, frozenset[str]], why: str) -> None:
        """Roll each deployment's services that read a changed secret, as a deploy does:
        the same spec as a new revision, those services replaced start-first."""
        for dep, services in sorted(users.items()):
            found = await self.io.call(self._current_source, dep)
            if found is None:
                continue
            spec, source = found
            for key in [k for k in self._failed if k[0] == dep and k[2] in services]:
                del self._failed[key]
            status = await self._store_revision(
                spec,
                source[0],
                source[1],
                f"rolled: {why} ({', '.join(sorted(services))})",
                services,
            )
            # A deploy-time job runs again only if it reads the secret (a migration
            # must not rerun because another service's password changed).
            for svc_name, svc in spec.services.items():
                if svc.rtype == "job" and svc_name not in services:
                    self._deploy_jobs_done.add((dep, status.revision, svc_name))

    def _current_source(self, name: str) -> tuple[DeploymentSpec, tuple[str, str]] | None:
        """Blocking: the spec and source (text, file name) of ``name``'s current revision."""
        stored = self.store.get(name)
        spec = self._spec(name, stored.revision) if stored else None
        source = self.store.revision_source(name, stored.revision) if stored else None
        if spec is None or source is None:
            return None
        return spec, source

    def _secrets_digest(self, name: str, svc: ServiceSpec) -> str:
        """Blocking: which stored version of each secret ``svc``'s env reads, as a short digest
        ("" when it reads none): it changes with every set or removal that matters."""
        from shared.spec.refs import secret_names

        names = sorted({n for value in svc.env.values() for n in secret_names(value)})
        if not names:
            return ""
        parts = []
        for secret in names:
            found = self.secrets.find(secret, name)
            parts.append(
                f"{secret}={found.deployment}:{found.version}:{found.updated_at!r}"
                if found
                else f"{secret}=-"
            )
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def _still_drifted(self, drifted: dict[str, set[str]]) -> dict[str, frozenset[str]]:
        """Blocking: those of ``drifted`` (deployment -> services) whose stored digest is still not
        what their secrets give now (a set or removal may have rolled them meanwhile)."""
        found: dict[str, frozenset[str]] = {}
        for dep, services in drifted.items():
            stored = self.store.get(dep)
            spec = self._spec(dep, stored.revision) if stored else None
            if stored is None or spec is None or stored.removing:
                continue
            states = self.store.service_states(dep)
            left = frozenset(
                svc
                for svc in services
                if svc in spec.services
                and svc in states
                and states[svc].secrets != self._secrets_digest(dep, spec.services[svc])
            )
            if left:
                found[dep] = left
        return found

    async def set_secret(self, name: str, deployment: str, value: str) -> SecretInfo:
        async with self._secrets_lock:
            secret = await self.io.call(self.secrets.set, name, deployment, value)
            what = "set" if secret.version == 1 else f"changed (version {secret.version})"
            scope = f"deployment {deployment}" if deployment else "node-wide"
            log.info("secret %s (%s) %s", name, scope, what)
            users = await self.io.call(self._users, name, deployment)
            await self._roll(users, f"secret {name} {what}")
        return info(secret)

    async def remove_secret(self, name: str, deployment: str) -> None:
        def read() -> tuple[dict[str, frozenset[str]], list[str]]:
            self.secrets.require(name, deployment)
            users = self._users(name, deployment)
            # Without this one, do they still find a value (a deployment's own -> node-wide)?
            fallback = bool(deployment) and self.secrets.find(name, "") is not None
            return users, sorted(dep for dep in users if not fallback)

        users, stranded = await self.io.call(read)
        if stranded:
            raise ConflictError(
                f"secret {name} is used by deployment {stranded[0]} "
                f"({', '.join(sorted(users[stranded[0]]))}); remove `$S:{name}` from its spec "
                f"and deploy, or `zlayerctl down {stranded[0]}`, first"
            )
        async with self._secrets_lock:
            await self.io.call(self.store.remove_secret, name, deployment)
            await self._roll(users, f"secret {name} of deployment {deployment} removed")
        log.info(
            "secret %s (%s) removed",
            name,
            f"deployment {deployment}" if deployment else "node-wide",
        )

    async def list_secrets(self) -> list[SecretInfo]:
        return [info(s) for s in await self.io.call(self.store.secrets)]

    async def get_secret(self, name: str, deployment: str) -> SecretValue:
        secret = await self.io.call(self.secrets.require, name, deployment)
        value = await asyncio.to_thread(self.secrets.open, secret)
        return SecretValue(name=name, deployment=deployment, value=value)

    # ------------------------------------------------------------ status

    async def cluster_replicas(self, name: str = "") -> list[ReplicaInfo]:
        """Every replica of ``name`` ("" for all), each with its node: this node's and, in
        a cluster, those the other nodes publish (what `ps --containers` shows)."""
        local = await self._replicas(name)
        if self.placement is None:
            return local
        node = self.placement.node_id
        found = [msgspec.structs.replace(r, node=node) for r in local]
        found += [r for r in self.placement.remote.values() if not name or r.deployment == name]
        return sorted(found, key=lambda r: (r.deployment, r.service, r.revision, r.instance))

    async def _replicas(self, name: str) -> list[ReplicaInfo]:
        return await self.replica_cache.replicas(name)

    async def _job_runs(self, name: str, service: str) -> list[JobRun]:
        return await self._agent_call(self.agent.list_job_runs(name, service))

    async def spec_text(self, name: str) -> str:
        """The spec text of ``name``'s current revision, as it was deployed."""
        return (await self._stored(name, removing_ok=True)).spec_text

    async def status(self, name: str) -> DeploymentStatus:
        reads = await self.io.call(self._status_reads, name)
        stored = reads.stored
        spec = self._current_spec(stored)  # parsed with the reads: no blocking here
        try:
            replicas = await self._replicas(name)
        except UnavailableError:
            replicas = []
        if self.placement is not None:
            replicas = replicas + self.placement.remote_replicas(name)
        status = deployment_status(
            name,
            stored,
            spec,
            replicas,
            holds=reads.holds,
            stopped=reads.stopped,
            states=reads.states,
            failed=self._failed,
            waiting=self._waiting,
            deployed_at=self._deployed_at.get(name, -math.inf),
            since=self.replica_cache.since,
            refusal=self.views.refusal(name),
            unrouted=lambda: self.views.unrouted(name, spec, replicas, self._desired),
        )
        return self._with_pending(status)

    def _with_pending(self, status: DeploymentStatus) -> DeploymentStatus:
        """In a cluster: a service with replicas that fit on no node says why."""
        placement = self.placement
        if placement is None or not placement.pending:
            return status
        services = []
        for svc in status.services:
            reason = placement.pending_reason(status.name, svc.name)
            if reason and not svc.message:
                svc = msgspec.structs.replace(svc, message=reason)
            services.append(svc)
        return msgspec.structs.replace(status, services=services)

    def _status_reads(self, name: str) -> _Reads:
        """Blocking: what status() reads of deployment ``name``, its spec parsed."""
        reads = self._read_deployment(name)
        if reads is None:
            self._require(name, removing_ok=True)  # NotFoundError, naming those there are
            return self._status_reads(name)  # stored again in between
        return reads

    async def list_status(self) -> list[DeploymentStatus]:
        found = []
        for name in await self.io.call(self.store.names):
            with contextlib.suppress(NotFoundError):  # its removal ended meanwhile
                found.append(await self.status(name))
        return found

    # ------------------------------------------------------------ the loop

    def wake(self) -> None:
        self._wake.set()
        if self.placement is not None:
            self.placement.kick()

    def _wasm_limit_event(self, info: ReplicaInfo) -> None:
        """A WebAssembly replica stopped by one of its limits: an event naming it."""
        if info.state == "exited" and info.message.startswith(WASM_LIMIT_PREFIX):
            self.event(
                info.deployment,
                "wasm-limit",
                f"replica {info.id} {info.message}",
                service=info.service,
                replica=info.id,
            )

    def _replica_noted(self, info: ReplicaInfo) -> None:
        self._wasm_limit_event(info)
        self._refusal_event(info)

    def _refusal_event(self, info: ReplicaInfo) -> None:
        """A replica agentd refused to start (its spec can never run there): one event
        with the sentence per refusal; a deploy that starts it again clears the mark."""
        said = self._refusals_said
        if not info.refused or info.state != "failed":  # started again, or removed
            said.pop(info.id, None)
            return
        if said.get(info.id) == info.message:
            return
        said[info.id] = info.message
        self.event(
            info.deployment,
            "refused",
            f"{info.message}; it is not retried until the spec changes",
            service=info.service,
            replica=info.id,
        )

    def _replicas_changed(self) -> None:
        self._wake.set()  # a replica's state is no placement's business: no kick
        self._statuses_changed()

    def _statuses_changed(self) -> None:
        self._status_changed.set()
        self._status_changed = asyncio.Event()

    # ------------------------------------------------------------ jobs

    async def converged(self, name: str, revision: int, job: Job) -> str:
        """A deploy job's work: wait until every service of ``name`` runs.

        Returns the final DeploymentStatus (JSON); raises with the sentence
        `zlayerctl up -d` says when a service or the deployment fails, and
        when the deployment is removed or stopped or a newer revision is
        deployed meanwhile (that deploy has its own job). Woken by the loop
        and the replica signals, not a timer. Cancelling it stops the
        waiting only: the revision stays deployed.
        """
        while True:
            changed = self._status_changed
            try:
                status = await self.status(name)
            except NotFoundError:
                raise NotFoundError(f"{name} was removed before it ran") from None
            for svc in status.services:
                job.progress(svc.name, done=svc.healthy, total=svc.desired, state=svc.state)
            failed = [s for s in status.services if s.state == "failed"]
            if failed:
                reason = failed[0].message or "see zlayerctl ps"
                raise ZLayerError(f"{name} failed: {failed[0].name}: {reason}")
            if status.state == "failed":  # the deployment as a whole: its traffic was refused
                raise ZLayerError(f"{name} failed: {status.message or 'see zlayerctl events'}")
            if status.state in ("removing", "stopped"):
                raise ZLayerError(
                    f"{name} is {'being removed' if status.state == 'removing' else 'stopped'}"
                )
            if status.revision != revision:
                raise ZLayerError(
                    f"revision {revision} of {name} was replaced by revision {status.revision}"
                )
            if status.state == "running":
                return encode(status)
            await changed.wait()

    async def removed(self, name: str, job: Job) -> str:
        """A down job's work: wait until ``name`` is gone; its progress is the replicas
        left (``state`` says how many still stop). Cancelling it stops the waiting only."""

        async def left(status: DeploymentStatus) -> tuple[int | None, str]:
            try:
                count: int | None = len(await self._replicas(name))
            except UnavailableError:
                count = None  # agentd away: keep the last count
            return count, status.message or "stopping its replicas"

        return await self._count_down(name, job, "removed", left, until_zero=False)

    async def settled(self, name: str, services: set[str] | None, target: int, job: Job) -> str:
        """A stop or scale job's work: wait until each of ``services`` (every service for
        None) of ``name`` runs ``target`` replicas at most and none still stops, or
        ``name`` is gone. Its progress is one item, ``name``: the replicas that had to
        stop (``total``) and how many did (``done``). Cancelling it stops the waiting only.
        """

        async def left(status: DeploymentStatus) -> tuple[int | None, str]:
            count = replicas_over(status, services, target)
            return count, "stopping" if count else "stopped"

        return await self._count_down(name, job, "gone", left, until_zero=True)

    async def _count_down(
        self,
        name: str,
        job: Job,
        gone_state: str,
        left: Callable[[DeploymentStatus], Awaitable[tuple[int | None, str]]],
        *,
        until_zero: bool,
    ) -> str:
        """Report ``name``'s replicas left to stop as ``job``'s progress, woken by every
        status change, until the deployment is gone (or, ``until_zero``, none is left).
        The total is the most seen, so ``done`` only grows."""
        total: int | None = None
        count = 0
        while True:
            changed = self._status_changed
            try:
                status = await self.status(name)
            except NotFoundError:
                job.progress(name, done=total or 0, total=total or 0, state=gone_state)
                return ""
            found, state = await left(status)
            count = count if found is None else found
            if total is None or count > total:
                total = count
            job.progress(name, done=total - count, total=total, state=state)
            if until_zero and not count:
                return ""
            await changed.wait()

    def resync(self, daemon: str) -> None:
        """``daemon`` (or every holder, for "") started: send it the complete view now."""
        self.views.resync(daemon)

    def _wanted(self) -> list[Demand]:
        """Blocking: every deployment's replicas to place, from the desired state."""
        from daemons.schedd.cluster_placement import wanted

        return wanted(self.store, self._spec)

    def _pending_event(self, deployment: str, kind: str, message: str, service: str) -> None:
        # Said of a deployment still stored: placement parsed its spec, kept until removal.
        if any(key[0] == deployment for key in list(self._specs)):
            self.event(deployment, kind, message, service=service)

    async def _overlay_subnet(self) -> str:
        network = await asyncio.wait_for(self.overlay.get_network(), TRAFFIC_TIMEOUT)
        return network.subnet

    def _runs_jobs(self) -> bool:
        """Jobs and cron jobs run on one node: alone, this one; in a cluster, the leader."""
        return self.cluster is None or bool(self.cluster.membership.is_leader)

    async def run(self) -> None:
        if self.cluster is not None and self.placement is None:
            # etcd's client comes with the cluster: a lone node never imports it
            from daemons.schedd.cluster_placement import ClusterPlacement

            self.placement = ClusterPlacement(
                self.cluster.client,
                self.cluster.membership,
                self._wanted,
                self._wake.set,  # its news wakes the loop; it needs no placement
                self._pending_event,
                self._overlay_subnet,
            )
            self.placement.start()
        try:
            await self._run()
        finally:
            if self.placement is not None:
                placement, self.placement = self.placement, None
                await placement.stop()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.reconcile_pass()
            except UnavailableError as exc:
                PASS_ERRORS.labels(reason="unavailable").inc()
                log.warning("reconcile paused: %s", exc)
            except Exception:
                PASS_ERRORS.labels(reason="error").inc()
                log.exception("reconcile pass failed; retrying")
            self._statuses_changed()
            took = time.monotonic() - started
            PASS_SECONDS.observe(took)
            if took > SLOW_PASS:
                log.warning("a reconcile pass took %.1fs", took)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PASS_INTERVAL)
            self._wake.clear()

    async def reconcile_pass(self) -> None:
        """One level-triggered pass: every deployment from the store, then full views out.

        The traffic views go first, so a replica this pass stops is out of
        rotation before agentd is told to stop it.
        """
        replicas = await self._replicas("")
        local = replicas
        if self.placement is not None:
            if not self.placement.known:
                return  # what this node owns is not read yet: it neither starts nor stops
            await self.placement.publish(replicas)
            replicas = replicas + list(self.placement.remote.values())
        self._pass_stored = {}
        previous, self._desired = self._desired, {}
        self._previous_desired = previous
        views: list[DeploymentTraffic] = []
        for name in await self.io.call(self.store.names):
            # One call in the store's thread per deployment for its reads: on etcd each read is a
            # round trip, which must not hold the event loop.
            reads = await self.io.call(self._read_deployment, name)
            if reads is None:
                continue
            stored = reads.stored
            mine = [r for r in replicas if r.deployment == name]
            if stored.removing:
                if not mine:
                    await self._finish_removal(name)
                    self.event(name, "removed", f"{name} removed: every replica is gone")
                continue
            view = await self._reconcile(reads, mine, previous)
            if view is not None:
                views.append(view)
        self._pass_stored = {}  # outside a pass, _apply reads the store afresh
        peers = self.placement.peers() if self.placement is not None else None
        desired = self._desired
        if self.placement is not None:
            desired = owned_first(local, desired)  # a node that comes back stops first
        await self.views.sync(views, desired, peers)
        drifted, self._drifted = self._drifted, {}
        if drifted:
            # A secret changed and its roll was not stored (schedd stopped in between).
            async with self._secrets_lock:
                left = await self.io.call(self._still_drifted, drifted)
                await self._roll(left, "secrets changed since the last roll")

    def _read_deployment(self, name: str) -> _Reads | None:
        """Blocking: what a pass reads of one deployment (None: it is gone), with the
        specs of its current revision and of those its services serve and roll out
        parsed, so the loop finds them without reading the store, and the digest of
        the secrets each service reads."""
        stored = self.store.get(name)
        if stored is None:
            return None
        states = self.store.service_states(name)
        revisions = {stored.revision} | {r for s in states.values() for r in (s.serving, s.target)}
        for revision in revisions:
            self._spec(name, revision)
        spec = self._spec(name, stored.revision)
        services = spec.services if spec is not None else {}
        return _Reads(
            stored,
            self.store.scale_holds(name),
            self.store.stopped_services(name),
            self.store.cron_disabled(name),
            states,
            {svc_name: self._secrets_digest(name, svc) for svc_name, svc in services.items()},
        )

    async def _reconcile(
        self,
        reads: _Reads,
        replicas: list[ReplicaInfo],
        previous: dict[tuple[str, str], ServiceAssignment],
    ) -> DeploymentTraffic | None:
        """Decide one deployment's assignments for this pass; its traffic view."""
        stored = reads.stored
        name = stored.name
        spec = self._spec(name, stored.revision)
        if spec is None:  # pragma: no cover - a stored deployment has its revision
            return None
        self._pass_stored[name] = stored
        holds, stopped, cron_off, states = reads.holds, reads.stopped, reads.cron_off, reads.states
        present = {r.service for r in replicas}
        for gone in sorted(present - set(spec.services)):
            if (name, gone) not in self._gone_services:
                self._gone_services.add((name, gone))
                self.event(name, "removed", f"removing {gone}: no longer in the spec", service=gone)
        self._gone_services = {
            k for k in self._gone_services if k[0] != name or k[1] in present - set(spec.services)
        }
        for svc_name in start_order(spec):
            svc = spec.services[svc_name]
            state = states.get(svc_name)
            if state is None:  # a deployment stored before per-service revisions
                state = ServiceState(stored.revision, stored.revision)
                await self.io.call(self.store.put_service_state, name, svc_name, state)
                states[svc_name] = state
            key = (name, stored.revision, svc_name)
            if (stored.stopped or svc_name in stopped) and state.rollout == "running":
                # Nothing of it runs any more: the new revision is what starts next time.
                await self.rollouts.end(
                    name,
                    svc_name,
                    state,
                    "rollout-ended",
                    f"{svc_name} was stopped during its rollout; it starts at revision "
                    f"{state.target} next time",
                )
            revision = state.serving if state.rollout == "failed" else state.target
            if stored.stopped or svc_name in stopped:
                await self._apply(
                    name,
                    revision,
                    svc_name,
                    self._service_spec(name, revision, svc_name) or svc,
                    0,
                    grace=self._stop_grace.get((name, svc_name)),
                )
                self._observe(name, svc_name, 0, replicas)
                continue
            self._stop_grace.pop((name, svc_name), None)
            if key in self._failed:
                continue
            started = any(r.service == svc_name for r in replicas)
            # depends orders the first start; a service that runs keeps running
            # while a dependency has a bad moment (and across schedd restarts).
            if not started and not await self._depends_ready(
                name, stored.revision, svc_name, svc, replicas
            ):
                if (name, svc_name) in previous:
                    self._desired[(name, svc_name)] = previous[(name, svc_name)]
                continue
            if (
                state.rollout == ""
                and not self._secrets_lock.locked()
                and state.secrets != reads.digests.get(svc_name, "")
            ):
                self._drifted.setdefault(name, set()).add(svc_name)
            want = desired_replicas(svc, holds.get(svc_name), state.adaptive)
            if state.rollout == "running":
                await self.rollouts.step(name, svc_name, state, want, replicas)
            else:
                await self._apply(
                    name,
                    revision,
                    svc_name,
                    self._service_spec(name, revision, svc_name) or svc,
                    want,
                )
            self._observe(name, svc_name, want if svc.rtype == "service" else 0, replicas)
            if not self._runs_jobs():
                continue
            if svc.rtype == "job" and key not in self._deploy_jobs_done:
                self._deploy_jobs_done.add(key)
                await self.trigger_job(name, svc_name, "deploy")
            if svc.rtype == "cron" and svc.schedule and svc_name not in cron_off:
                await self._cron_tick(name, svc_name, svc.schedule, stored.created_at)
        if not stored.stopped:
            await self._autoscale(name, spec, states, holds, replicas)
        elsewhere = (
            {(r.node, r.id) for r in self.placement.remote_replicas(name)}
            if self.placement is not None
            else set()
        )
        return deployment_traffic(
            name, spec, states, replicas, self.rollouts.draining, self._desired, elsewhere
        )

    def _observe(self, name: str, service: str, desired: int, replicas: list[ReplicaInfo]) -> None:
        """Export a service's desired, running and healthy replica counts."""
        running = [r for r in replicas if r.service == service and r.state == "running"]
        healthy = [r for r in running if r.health in IN_ROTATION]
        REPLICAS.labels(name, service, "desired").set(desired)
        REPLICAS.labels(name, service, "running").set(len(running))
        REPLICAS.labels(name, service, "healthy").set(len(healthy))

    def _forget_metrics(self, name: str) -> None:
        for labels in list(REPLICAS._metrics):
            if labels[0] == name:
                REPLICAS.remove(*labels)

    # ------------------------------------------------------------ autoscaling

    async def _autoscale(
        self,
        name: str,
        spec: DeploymentSpec,
        states: dict[str, ServiceState],
        holds: dict[str, int],
        replicas: list[ReplicaInfo],
    ) -> None:
        from shared.spec.models import AdaptiveScale

        adaptive = {
            svc_name: svc
            for svc_name, svc in spec.services.items()
            if svc.rtype == "service"
            and isinstance(svc.scale, AdaptiveScale)
            and svc_name not in holds
            and svc_name in states
            and states[svc_name].rollout != "running"
        }
        if not adaptive:
            return
        now = time.monotonic()
        if now - self._sampled_at.get(name, 0.0) < AUTOSCALE_INTERVAL:
            return
        self._sampled_at[name] = now
        rps = await self._request_rates(name)
        for svc_name, svc in adaptive.items():
            assert isinstance(svc.scale, AdaptiveScale)
            state = states[svc_name]
            current = desired_replicas(svc, None, state.adaptive)
            running = [
                r
                for r in replicas
                if r.service == svc_name and r.state == "running" and r.revision == state.serving
            ]
            stats = await self._stats(running)
            cores = svc.resources.cpu if svc.resources else None
            load = replica_load(stats, cores)
            load = Load(load.cpu_percent, load.memory_percent, rps.get(svc_name))
            decision = decide(current, svc.scale, load)
            if decision.replicas == current:
                if state.adaptive is None:
                    state.adaptive = current
                    await self.io.call(self.store.put_service_state, name, svc_name, state)
                continue
            cooldown = svc.scale.cooldown.total_seconds()
            if state.scaled_at and time.time() - state.scaled_at < cooldown:
                continue
            state.adaptive, state.scaled_at = decision.replicas, time.time()
            await self.io.call(self.store.put_service_state, name, svc_name, state)
            self.event(
                name,
                "scaled",
                f"scaled {svc_name} {current} -> {decision.replicas}: {decision.reason}",
                service=svc_name,
            )
            self.wake()

    async def _stats(self, replicas: list[ReplicaInfo]) -> list[ReplicaStats]:
        found = []
        for replica in replicas:
            try:
                stats = await self._agent_call(self.agent.stats(replica.id))
            except ZLayerError:
                continue  # it ended between the listing and now
            found.append(stats)
        return found

    async def _request_rates(self, name: str) -> dict[str, float]:
        """Requests per second per service of ``name`` since the last sample, from proxyd."""
        try:
            stats = await asyncio.wait_for(self.proxyd.service_stats(), TRAFFIC_TIMEOUT)
        except Exception as exc:  # proxyd down: scale on cgroup figures alone
            log.debug("no request rates from proxyd: %s", exc)
            return {}
        rates = {}
        for item in stats:
            if item.deployment != name:
                continue
            key = f"{name}/{item.service}@{item.started_at}"
            rate = self._sampler.rate(key, item.requests_total)
            if rate is not None:
                rates[item.service] = rate
        return rates

    async def _depends_ready(
        self, name: str, revision: int, svc_name: str, svc: ServiceSpec, replicas: list[ReplicaInfo]
    ) -> bool:
        key = (name, revision, svc_name)
        for dep in svc.depends:
            dep_replicas = [r for r in replicas if r.service == dep.service]
            jobs = await self._job_runs(name, dep.service) if not dep_replicas else []
            if condition_met(dep.condition, dep_replicas, jobs):
                continue
            waiting = self._waiting.setdefault(key, _Waiting(time.monotonic()))
            if time.monotonic() - waiting.since < dep.timeout.total_seconds():
                return False
            reason = (
                f"{dep.service} was not {dep.condition} within {dep.timeout.total_seconds():.0f}s"
            )
            if dep.on_timeout == "fail":
                self._failed[key] = f"not started: {reason}"
                self._waiting.pop(key, None)
                self.event(
                    name, "depends-failed", f"{svc_name} not started: {reason}", service=svc_name
                )
                return False
            if dep.on_timeout == "warn" and not waiting.warned:
                waiting.warned = True
                self.event(
                    name,
                    "depends-timeout",
                    f"starting {svc_name} anyway: {reason}",
                    service=svc_name,
                )
        self._waiting.pop(key, None)
        return True

    async def _apply(
        self,
        name: str,
        revision: int,
        svc_name: str,
        svc: ServiceSpec,
        want: int,
        force: bool = False,
        previous: list[RevisionReplicas] | None = None,
        grace: float | None = None,
    ) -> None:
        """Make ``want`` replicas of ``svc`` part of this pass's assignments.

        They reach agentd with the pass's full view; ``force`` also sends this
        one assignment at once (a job about to be run needs it there now).
        """
        from shared.spec.refs import UnresolvedReferenceError

        stored = self._pass_stored.get(name) or await self.io.call(self.store.get, name)
        dumped = svc.model_dump(mode="json", by_alias=True, exclude_none=True)

        def resolve() -> tuple[dict[str, Any], list[RevisionReplicas]]:
            return self._with_secrets(name, svc_name, dumped), [
                msgspec.structs.replace(old, spec=self._with_secrets(name, svc_name, old.spec))
                for old in previous or []
            ]

        try:
            if _reads_secrets(dumped) or any(_reads_secrets(old.spec) for old in previous or []):
                resolved, older = await self.io.call(resolve)  # the secrets are in the store
            else:
                resolved, older = resolve()
        except (UnresolvedReferenceError, SecretUnreadableError) as exc:
            if force:  # a job run asked for now: its caller hears why it cannot start
                raise InvalidSpecError(str(exc)) from None
            # Nothing of it can start: the service fails with the sentence (naming the
            # secret, never a value), as `up` and `ps` show; replicas it runs keep running.
            key = (name, stored.revision if stored else revision, svc_name)
            if key not in self._failed:
                self._failed[key] = str(exc)
                self.event(name, "secret-missing", f"{svc_name} not started: {exc}", svc_name)
            if (name, svc_name) in self._previous_desired:
                self._desired[(name, svc_name)] = self._previous_desired[(name, svc_name)]
            return
        assignment = ServiceAssignment(
            deployment=name,
            service=svc_name,
            revision=revision,
            spec=resolved,
            replicas=want,
            previous=older,
            retry=stored.revision if stored else 0,
            grace=grace,
        )
        if self.placement is not None and want > 0 and svc.rtype == "service":
            # In a cluster this node runs the instances placed on it, and no others.
            placed = self.placement.instances(name, svc_name)
            if not placed:
                self._desired.pop((name, svc_name), None)
                return
            assignment = msgspec.structs.replace(assignment, instances=placed)
        before = self._desired.get((name, svc_name))
        self._desired[(name, svc_name)] = assignment
        if force:
            await self._agent_call(self.agent.apply_service(assignment))
        elif before is None or before.replicas != want or before.revision != revision:
            log.debug("%s: %s at revision %d: %d replicas", name, svc_name, revision, want)

    async def _cron_tick(self, name: str, svc_name: str, schedule: str, created_at: float) -> None:
        key = (name, svc_name)
        now = time.time()
        if key not in self._cron_next:
            last = await self.io.call(self.store.last_cron_run, name, svc_name) or max(
                created_at, now
            )
            self._cron_next[key] = next_cron_time(schedule, last)
        if now >= self._cron_next[key]:
            fired = self._cron_next[key]
            await self.io.call(self.store.record_cron_run, name, svc_name, fired)
            self._cron_next[key] = next_cron_time(schedule, max(fired, now))
            await self.trigger_job(name, svc_name, "schedule")

    async def _agent_call(self, call: Awaitable[T], timeout: float = AGENT_TIMEOUT) -> T:
        return await agent_call(call, timeout)
