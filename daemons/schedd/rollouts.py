"""Rollouts: a service moving from the revision that serves to a new one, start-first.

This module owns a rollout from its start to its end: which services of a
new revision roll out and which switch at once (a deploy's plan), each step
(new replicas a batch at a time, old ones out of rotation, drained for
``DRAIN_SECONDS``, then stopped), its end once the new revision serves at
full strength, and its failure, which rolls the service back to the old
revision at full strength. It keeps which replicas are draining now, which
the traffic views leave out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from daemons.schedd.store import DesiredStore, ServiceState, StoreThread
from daemons.schedd.views import IN_ROTATION
from shared.wire.agent import ReplicaInfo, RevisionReplicas

if TYPE_CHECKING:
    # the spec models load with the first deployment, not at start
    from shared.spec import DeploymentSpec, ServiceSpec

DRAIN_SECONDS = 2.0  # old replicas leave rotation this long before they are stopped
ROLLOUT_MAX_RESTARTS = 3  # a new replica restarting this often fails the rollout


def _rollout_failure(fresh: list[ReplicaInfo], spec: ServiceSpec, waited: float) -> str:
    """Why the new replicas of a rollout will not do, or "" while they still may."""
    for replica in fresh:
        if replica.state == "failed":
            return f"replica {replica.id} failed: {replica.message or 'it could not start'}"
        if replica.restarts >= ROLLOUT_MAX_RESTARTS:
            exit_code = f" (exit code {replica.exit_code})" if replica.exit_code is not None else ""
            return f"replica {replica.id} restarted {replica.restarts} times{exit_code}"
    health = spec.health
    grace = health.start_grace.total_seconds() if health.start_grace else 5.0
    interval = health.interval.total_seconds() if health.interval else 10.0
    deadline = max(60.0, grace + interval * (health.retries + 2))
    if waited > deadline and not all(
        r.state == "running" and r.health in IN_ROTATION for r in fresh
    ):
        return f"the new replicas were not healthy within {deadline:.0f}s"
    return ""


class Rollouts:
    """Each service's rollout, one step a reconcile pass, with the store's ServiceState."""

    def __init__(
        self,
        store: DesiredStore,
        io: StoreThread,
        service_spec: Callable[[str, int, str], ServiceSpec | None],
        event: Callable[..., None],
        apply: Callable[..., Awaitable[None]],
    ) -> None:
        self.store = store
        self.io = io  # where the store's calls run
        self.service_spec = service_spec  # (deployment, revision, service) -> its spec
        self.event = event
        self.apply = apply  # makes replicas of a revision part of this pass's assignments
        # (deployment, service) -> (replica ids leaving rotation, since when)
        self.draining: dict[tuple[str, str], tuple[set[str], float]] = {}

    def forget(self, name: str) -> None:
        """A removed deployment: none of its replicas drains."""
        for draining in [k for k in self.draining if k[0] == name]:
            del self.draining[draining]

    def plan(
        self,
        name: str,
        spec: DeploymentSpec,
        revision: int,
        replicas: list[ReplicaInfo],
        current: dict[str, ServiceState],
        roll: frozenset[str] = frozenset(),
    ) -> tuple[dict[str, ServiceState], list[tuple[str, str, str]]]:
        """Per service: keep its serving revision if unchanged, else roll out ``revision``.
        ``current`` is the services' stored states (changed in place). Blocking: it
        reads the specs of the revisions they serve (schedd runs it in the store's thread).

        The services in ``roll`` roll out even with an unchanged spec: a secret
        their env reads changed, and only new replicas get the new value.

        A service with nothing running (new, stopped, a job) switches at once;
        one with replicas serving rolls out start-first, batch by batch. The
        states to store (every service of ``spec``, no other) and the events
        to emit once they are stored, as (kind, service, message).
        """
        planned: dict[str, ServiceState] = {}
        events: list[tuple[str, str, str]] = []
        now = time.time()
        for svc_name, svc in spec.services.items():
            state = current.get(svc_name)
            if state is not None:
                serving = self.service_spec(name, state.serving, svc_name)
                if serving == svc and svc_name not in roll:
                    if state.target != state.serving:
                        events.append(
                            (
                                "rollout-cancelled",
                                svc_name,
                                f"{svc_name} stays at revision {state.serving}: the new spec "
                                "is the one it already runs",
                            )
                        )
                    state.target, state.rollout, state.message = state.serving, "", ""
                    state.new_count = state.old_count = 0
                    planned[svc_name] = state
                    continue
            serving_replicas = [
                r
                for r in replicas
                if r.service == svc_name
                and r.rtype == "service"
                and state is not None
                and r.revision == state.serving
                and r.state == "running"
            ]
            if state is None or svc.rtype != "service" or not serving_replicas:
                adaptive = state.adaptive if state else None
                planned[svc_name] = ServiceState(revision, revision, adaptive=adaptive)
                continue
            state.target, state.rollout, state.step_at = revision, "running", now
            state.new_count, state.old_count = 0, len(serving_replicas)
            state.message = f"rolling out revision {revision}"
            planned[svc_name] = state
            events.append(
                (
                    "rollout",
                    svc_name,
                    f"rolling out {svc_name} from revision {state.serving} to {revision}",
                )
            )
        return planned, events

    async def step(
        self,
        name: str,
        svc_name: str,
        state: ServiceState,
        want: int,
        replicas: list[ReplicaInfo],
    ) -> None:
        """One step of a start-first rollout; called every pass until it ends.

        New replicas start a batch at a time; once a batch is healthy (and so
        in rotation) as many old replicas leave rotation, drain for
        ``DRAIN_SECONDS`` and stop. New replicas that fail, restart too often or
        stay unhealthy past the deadline stop the rollout, and the old
        revision is restored to full strength.
        """
        new_spec = self.service_spec(name, state.target, svc_name)
        old_spec = self.service_spec(name, state.serving, svc_name)
        if new_spec is None or old_spec is None:  # pragma: no cover - revisions are kept
            state.serving, state.rollout = state.target, ""
            await self.io.call(self.store.put_service_state, name, svc_name, state)
            return
        now = time.time()
        batch = max(1, math.ceil(want / 4))
        mine = [r for r in replicas if r.service == svc_name and r.rtype == "service"]
        fresh = [r for r in mine if r.revision == state.target and r.instance <= state.new_count]
        in_rotation = [r for r in fresh if r.state == "running" and r.health in IN_ROTATION]
        changed = False
        # The first step starts the first batch. With no replicas wanted (a spec of
        # replicas: 0) there is none: the old ones leave as usual and the rollout ends
        # (counting that step as a change would start it again at every pass).
        if state.new_count == 0 and want > 0:
            state.new_count, state.step_at, changed = min(batch, want), now, True
        failure = _rollout_failure(fresh, new_spec, now - state.step_at)
        if failure:
            state.rollout = "failed"
            state.message = (
                f"rollout of revision {state.target} stopped: {failure}; "
                f"revision {state.serving} keeps serving"
            )
            state.new_count = state.old_count = 0
            await self.io.call(self.store.put_service_state, name, svc_name, state)
            self.draining.pop((name, svc_name), None)
            self.event(name, "rollout-failed", f"{svc_name}: {state.message}", service=svc_name)
            await self.apply(name, state.serving, svc_name, old_spec, want)
            return
        if len(in_rotation) >= state.new_count and not changed:
            surplus = state.old_count - max(0, want - len(in_rotation))
            if surplus > 0:
                keep = state.old_count - surplus
                leaving = {r.id for r in mine if r.revision == state.serving and r.instance > keep}
                draining = self.draining.get((name, svc_name))
                if draining is None or draining[0] != leaving:
                    self.draining[(name, svc_name)] = (leaving, now)
                elif now - draining[1] >= DRAIN_SECONDS:
                    state.old_count, state.step_at, changed = keep, now, True
                    self.draining.pop((name, svc_name), None)
            elif state.new_count < want:
                state.new_count, state.step_at, changed = (
                    min(want, state.new_count + batch),
                    now,
                    True,
                )
            else:
                await self.end(
                    name,
                    svc_name,
                    state,
                    "rolled-out",
                    f"{svc_name} now runs revision {state.target} ({want} replicas)",
                )
                await self.apply(name, state.target, svc_name, new_spec, want)
                return
        if changed:
            await self.io.call(self.store.put_service_state, name, svc_name, state)
        await self.apply(
            name,
            state.target,
            svc_name,
            new_spec,
            state.new_count,
            previous=[
                RevisionReplicas(
                    revision=state.serving,
                    spec=old_spec.model_dump(mode="json", by_alias=True, exclude_none=True),
                    replicas=state.old_count,
                )
            ],
        )

    async def end(
        self, name: str, svc_name: str, state: ServiceState, kind: str, message: str
    ) -> None:
        """The target revision is now the serving one: store it, stop draining, say so."""
        state.serving, state.rollout, state.message = state.target, "", ""
        state.new_count = state.old_count = 0
        await self.io.call(self.store.put_service_state, name, svc_name, state)
        self.draining.pop((name, svc_name), None)
        self.event(name, kind, message, service=svc_name)
