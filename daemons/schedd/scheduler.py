"""The reconcile loop: from the stored desired state to ``ApplyService`` calls on agentd.

schedd decides *what* should run (which revision, how many replicas of each
service, in which order given ``depends``, when a cron job fires); agentd
makes this node match and reports replicas back. The loop is level-driven:
every pass reads the store and agentd's replicas afresh, so a restarted
schedd (or agentd) converges again without remembering anything in memory
but timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from croniter import croniter

from daemons.schedd.store import Store, StoredDeployment
from shared.bus import (
    DAEMONS_BY_NAME,
    ConflictError,
    InvalidSpecError,
    NotFoundError,
    UnavailableError,
    ZLayerError,
    proxy,
)
from shared.models import (
    DeploymentStatus,
    DeployPlan,
    Event,
    JobRun,
    ReplicaInfo,
    ServiceAssignment,
    ServiceStatus,
)
from shared.spec import DeploymentSpec, ServiceSpec, SpecError, parse_spec
from shared.spec.models import AdaptiveScale, FixedScale
from shared.spec.refs import resolve_env

log = logging.getLogger("zlayer.schedd")

PASS_INTERVAL = 1.0  # seconds between reconcile passes
REAPPLY_INTERVAL = 30.0  # re-send unchanged assignments, in case agentd lost them
AGENT_TIMEOUT = 20.0


def desired_replicas(service: ServiceSpec, hold: int | None) -> int:
    """How many replicas a service wants: a manual hold wins, then the scale mode."""
    if service.rtype != "service":
        return 0  # jobs and cron jobs run on demand, not as standing replicas
    if hold is not None:
        return hold
    scale = service.scale
    if isinstance(scale, FixedScale):
        return scale.replicas
    if isinstance(scale, AdaptiveScale):
        return scale.min  # the autoscaler (a later capability) moves it within min..max
    return 1  # manual: one until `zlayerctl scale` says otherwise


def start_order(spec: DeploymentSpec) -> list[str]:
    """Services ordered so each comes after what it depends on (the spec has no cycles)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in spec.services[name].depends:
            if dep.service in spec.services:
                visit(dep.service)
        order.append(name)

    for name in spec.services:
        visit(name)
    return order


def _public_ports(spec: DeploymentSpec) -> dict[tuple[int, str], str]:
    """(port, transport) -> "service web endpoint http" for every public endpoint."""
    ports: dict[tuple[int, str], str] = {}
    for name, service in spec.services.items():
        for endpoint in service.endpoints:
            if endpoint.expose == "public":
                transport = "udp" if endpoint.protocol == "udp" else "tcp"
                ports[(endpoint.port, transport)] = f"service {name} endpoint {endpoint.name}"
    return ports


def next_cron_time(schedule: str, after: float) -> float:
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


@dataclass
class _Waiting:
    since: float
    warned: bool = False


class Scheduler:
    """Desired state, decisions, and the loop that hands them to agentd."""

    def __init__(self, store: Store, bus: Any, emit: Callable[[Event], None]) -> None:
        self.store = store
        self.bus = bus
        self.emit_signal = emit
        self._wake = asyncio.Event()
        self._applied: dict[tuple[str, str], tuple[str, float]] = {}
        self._waiting: dict[tuple[str, int, str], _Waiting] = {}
        self._failed: dict[tuple[str, int, str], str] = {}
        self._deploy_jobs_done: set[tuple[str, int, str]] = set()
        self._cron_next: dict[tuple[str, str], float] = {}

    @property
    def agent(self) -> Any:
        return proxy(DAEMONS_BY_NAME["agentd"], self.bus)

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
        self.store.add_event(event)
        self.emit_signal(event)

    # ------------------------------------------------------------ requests

    def _parse(self, spec_text: str, filename: str, host_env: dict[str, str]) -> DeploymentSpec:
        try:
            spec = parse_spec(spec_text, filename or "<spec>")
        except SpecError as exc:
            raise InvalidSpecError("\n".join(str(i) for i in exc.issues)) from None
        problems = resolve_env(spec, host_env)
        if problems:
            raise InvalidSpecError("\n".join(problems))
        return spec

    async def deploy(
        self, spec_text: str, filename: str, host_env: dict[str, str]
    ) -> DeploymentStatus:
        spec = self._parse(spec_text, filename, host_env)
        self._check_ports(spec)
        spec_json = spec.model_dump_json(by_alias=True)
        revision = await asyncio.to_thread(
            self.store.add_revision, spec.deployment, spec_json, spec_text, filename
        )
        self.event(spec.deployment, "deploy", f"revision {revision} of {spec.deployment} deployed")
        self.wake()
        return await self.status(spec.deployment)

    def _check_ports(self, spec: DeploymentSpec) -> None:
        """A public port belongs to one deployment on this node."""
        mine = _public_ports(spec)
        for other in self.store.names():
            if other == spec.deployment:
                continue
            stored = self.store.get(other)
            if stored is None:
                continue
            taken = _public_ports(DeploymentSpec.model_validate_json(stored.spec_json))
            for port_proto, where in mine.items():
                if port_proto in taken:
                    raise ConflictError(
                        f"{where} wants public port {port_proto[0]}/{port_proto[1]}, which "
                        f"{taken[port_proto]} of deployment {other} already uses; pick another "
                        "port or `zlayerctl down " + other + "` first"
                    )

    async def plan(self, spec_text: str, filename: str, host_env: dict[str, str]) -> DeployPlan:
        spec = self._parse(spec_text, filename, host_env)
        current = self.store.get(spec.deployment)
        old = DeploymentSpec.model_validate_json(current.spec_json) if current else None
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
        revision = self.store.next_revision(spec.deployment)
        return DeployPlan(deployment=spec.deployment, revision=revision, actions=actions)

    def _require(self, name: str) -> StoredDeployment:
        stored = self.store.get(name)
        if stored is None:
            known = ", ".join(self.store.names()) or "none"
            raise NotFoundError(f"there is no deployment named {name} (deployments: {known})")
        return stored

    async def down(self, name: str) -> None:
        self._require(name)
        await self._agent_call(self.agent.remove_service(name, "", 10.0, False), timeout=120)
        await asyncio.to_thread(self.store.remove, name)
        for key in [k for k in self._applied if k[0] == name]:
            del self._applied[key]
        log.info("%s: removed", name)

    async def stop(self, name: str, service: str, timeout_sec: float, force: bool) -> None:
        stored = self._require(name)
        spec = DeploymentSpec.model_validate_json(stored.spec_json)
        if service and service not in spec.services:
            raise NotFoundError(
                f"deployment {name} has no service {service} (services: {', '.join(spec.services)})"
            )
        await asyncio.to_thread(self.store.set_stopped, name, service, True)
        await self._agent_call(
            self.agent.remove_service(name, service, timeout_sec, force), timeout=timeout_sec + 60
        )
        self.event(name, "stopped", f"stopped {service or 'every service'}", service=service)
        self.wake()

    async def scale(self, name: str, service: str, replicas: int) -> None:
        stored = self._require(name)
        spec = DeploymentSpec.model_validate_json(stored.spec_json)
        if service not in spec.services:
            raise NotFoundError(
                f"deployment {name} has no service {service} (services: {', '.join(spec.services)})"
            )
        if spec.services[service].rtype != "service":
            raise InvalidSpecError(
                f"{service} is a {spec.services[service].rtype}; only services scale"
            )
        await asyncio.to_thread(self.store.hold_scale, name, service, replicas)
        await asyncio.to_thread(self.store.set_stopped, name, service, False)
        self.event(
            name,
            "scaled",
            f"scaled {service} to {replicas} (held until the next deploy)",
            service=service,
        )
        self.wake()

    async def trigger_job(self, name: str, service: str, trigger: str = "manual") -> JobRun:
        stored = self._require(name)
        spec = DeploymentSpec.model_validate_json(stored.spec_json)
        svc = spec.services.get(service)
        if svc is None or svc.rtype == "service":
            jobs = [n for n, s in spec.services.items() if s.rtype != "service"]
            raise NotFoundError(
                f"deployment {name} has no job or cron job named {service} "
                f"(jobs: {', '.join(jobs) or 'none'})"
            )
        await self._apply(name, stored.revision, service, svc, 0, force=True)
        raw = await self._agent_call(self.agent.run_job(name, service, trigger))
        run = JobRun.model_validate_json(raw)
        self.event(
            name, "job-started", f"{trigger} run {run.id} of {service} started", service=service
        )
        return run

    def cron_schedules(self, name: str) -> list[dict[str, Any]]:
        names = [name] if name else self.store.names()
        rows = []
        for dep in names:
            stored = self.store.get(dep)
            if stored is None:
                continue
            spec = DeploymentSpec.model_validate_json(stored.spec_json)
            for svc_name, svc in spec.services.items():
                if svc.rtype == "cron" and svc.schedule:
                    rows.append(
                        {
                            "deployment": dep,
                            "service": svc_name,
                            "schedule": svc.schedule,
                            "next_run": self._cron_next.get((dep, svc_name)),
                            "last_run": self.store.last_cron_run(dep, svc_name),
                        }
                    )
        return rows

    # ------------------------------------------------------------ status

    async def _replicas(self, name: str) -> list[ReplicaInfo]:
        raw = await self._agent_call(self.agent.list_replicas(name, ""))
        return [ReplicaInfo.model_validate(r) for r in json.loads(raw)]

    async def _job_runs(self, name: str, service: str) -> list[JobRun]:
        raw = await self._agent_call(self.agent.list_job_runs(name, service))
        return [JobRun.model_validate(r) for r in json.loads(raw)]

    async def status(self, name: str) -> DeploymentStatus:
        stored = self._require(name)
        spec = DeploymentSpec.model_validate_json(stored.spec_json)
        try:
            replicas = await self._replicas(name)
        except UnavailableError:
            replicas = []
        holds = self.store.scale_holds(name)
        stopped = self.store.stopped_services(name)
        services = []
        for svc_name in start_order(spec):
            svc = spec.services[svc_name]
            mine = [r for r in replicas if r.service == svc_name and r.revision == stored.revision]
            desired = (
                0
                if (stored.stopped or svc_name in stopped)
                else desired_replicas(svc, holds.get(svc_name))
            )
            running = sum(1 for r in mine if r.state == "running")
            healthy = sum(
                1 for r in mine if r.state == "running" and r.health in ("healthy", "none")
            )
            key = (name, stored.revision, svc_name)
            message = self._failed.get(key, "")
            if svc.rtype != "service":
                state = "running" if running else "pending"
            elif key in self._failed:
                state = "failed"
            elif mine and all(r.state == "failed" for r in mine):
                state = "failed"  # every replica failed to start; agentd keeps retrying
                message = mine[0].message
            elif stored.stopped or svc_name in stopped:
                state = "stopped"
            elif key in self._waiting:
                state = "waiting"
                deps = ", ".join(f"{d.service} ({d.condition})" for d in svc.depends)
                message = message or f"waiting for {deps}"
            elif healthy >= desired and running == desired:
                state = "running"
            elif running == 0:
                state = "starting"
                message = message or next((r.message for r in mine if r.message), "")
            else:
                state = "degraded" if healthy < desired else "starting"
                message = message or next((r.message for r in mine if r.message), "")
            services.append(
                ServiceStatus(
                    name=svc_name,
                    rtype=svc.rtype,
                    image=svc.image.name,
                    desired=desired,
                    running=running,
                    healthy=healthy,
                    state=state,
                    message=message,
                )
            )
        if stored.stopped:
            overall = "stopped"
        elif any(s.state == "failed" for s in services):
            overall = "failed"
        elif all(s.state in ("running", "pending", "stopped") for s in services):
            overall = "running"
        elif any(s.state in ("waiting", "starting") for s in services):
            overall = "deploying"
        else:
            overall = "degraded"
        return DeploymentStatus(
            name=name,
            revision=stored.revision,
            state=overall,
            services=services,
            created_at=stored.created_at,
            updated_at=stored.updated_at,
        )

    async def list_status(self) -> list[DeploymentStatus]:
        return [await self.status(name) for name in self.store.names()]

    # ------------------------------------------------------------ the loop

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                for name in self.store.names():
                    await self._reconcile(name)
            except UnavailableError as exc:
                log.warning("reconcile paused: %s", exc)
            except Exception:
                log.exception("reconcile pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PASS_INTERVAL)
            self._wake.clear()

    async def _reconcile(self, name: str) -> None:
        stored = self.store.get(name)
        if stored is None:
            return
        spec = DeploymentSpec.model_validate_json(stored.spec_json)
        holds = self.store.scale_holds(name)
        stopped = self.store.stopped_services(name)
        replicas = await self._replicas(name)
        present = {r.service for r in replicas}
        for gone in sorted(present - set(spec.services)):
            await self._agent_call(self.agent.remove_service(name, gone, 10.0, False), timeout=120)
            self._applied.pop((name, gone), None)
            self.event(name, "removed", f"removed {gone}: no longer in the spec", service=gone)
        for svc_name in start_order(spec):
            svc = spec.services[svc_name]
            key = (name, stored.revision, svc_name)
            if key in self._failed:
                continue
            if stored.stopped or svc_name in stopped:
                continue
            if not await self._depends_ready(name, stored.revision, svc_name, svc, replicas):
                continue
            want = desired_replicas(svc, holds.get(svc_name))
            await self._apply(name, stored.revision, svc_name, svc, want)
            if svc.rtype == "job" and key not in self._deploy_jobs_done:
                self._deploy_jobs_done.add(key)
                await self.trigger_job(name, svc_name, "deploy")
            if svc.rtype == "cron" and svc.schedule:
                await self._cron_tick(name, svc_name, svc.schedule, stored.created_at)

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
    ) -> None:
        assignment = ServiceAssignment(
            deployment=name,
            service=svc_name,
            revision=revision,
            spec=svc.model_dump(mode="json", by_alias=True, exclude_none=True),
            replicas=want,
        )
        text = assignment.model_dump_json()
        last = self._applied.get((name, svc_name))
        if (
            not force
            and last is not None
            and last[0] == text
            and time.monotonic() - last[1] < REAPPLY_INTERVAL
        ):
            return
        await self._agent_call(self.agent.apply_service(text))
        if last is None or last[0] != text:
            log.info("%s: %s at revision %d: %d replicas", name, svc_name, revision, want)
        self._applied[(name, svc_name)] = (text, time.monotonic())

    async def _cron_tick(self, name: str, svc_name: str, schedule: str, created_at: float) -> None:
        key = (name, svc_name)
        now = time.time()
        if key not in self._cron_next:
            last = self.store.last_cron_run(name, svc_name) or max(created_at, now)
            self._cron_next[key] = next_cron_time(schedule, last)
        if now >= self._cron_next[key]:
            fired = self._cron_next[key]
            await asyncio.to_thread(self.store.record_cron_run, name, svc_name, fired)
            self._cron_next[key] = next_cron_time(schedule, max(fired, now))
            await self.trigger_job(name, svc_name, "schedule")

    async def _agent_call(self, call: Any, timeout: float = AGENT_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(call, timeout)
        except ZLayerError:
            raise
        except TimeoutError:
            raise UnavailableError(
                "zlayer-agentd did not answer in time; check `zlayerctl status`"
            ) from None
        except Exception as exc:
            raise UnavailableError(
                f"zlayer-agentd is not reachable ({exc}); check `zlayerctl status`"
            ) from None
