"""What a deployment shows: its ServiceStatus and DeploymentStatus, and what it wants.

This module owns how many replicas a service wants (a manual hold, then its
scale mode), the order services start in (after what they depend on), and
the status of a deployment as `zlayerctl status` and `ps` show it, computed
from agentd's replicas (schedd's copy of them) and the store, plus what the
reconcile loop knows and keeps in memory: services that gave up or wait on
their dependencies, when the deployment was last deployed, and whether the
traffic holders refused or do not yet route it.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from typing import TYPE_CHECKING

from daemons.schedd.store import ServiceState, StoredDeployment
from daemons.schedd.views import IN_ROTATION
from shared.wire.agent import ReplicaInfo
from shared.wire.scheduler import DeploymentState, DeploymentStatus, ServiceStatus
from shared.wire.scheduler import ServiceState as ServiceCondition

if TYPE_CHECKING:
    # the spec models load with the first deployment, not at start
    from shared.spec import DeploymentSpec, ServiceSpec


def desired_replicas(service: ServiceSpec, hold: int | None, adaptive: int | None = None) -> int:
    """How many replicas a service wants: its replica groups' counts when it has
    groups (they set the count, as placement places them), else a manual hold, then
    the scale mode."""
    from shared.spec.models import AdaptiveScale, FixedScale

    if service.rtype != "service":
        return 0  # jobs and cron jobs run on demand, not as standing replicas
    if service.replica_groups:
        return sum(group.count for group in service.replica_groups)
    if hold is not None:
        return hold
    scale = service.scale
    if isinstance(scale, FixedScale):
        return scale.replicas
    if isinstance(scale, AdaptiveScale):
        # The autoscaler's last decision, kept within the spec's current bounds.
        if adaptive is None:
            return scale.min
        return min(max(adaptive, scale.min), max(scale.min, scale.max))
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


def failed_since_deploy(
    replica: ReplicaInfo, deployed: float, since: Callable[[str], float]
) -> bool:
    """Whether ``replica`` failed after the last deploy of its deployment (at ``deployed``).

    A deploy makes agentd retry failed replicas at once (the assignments'
    ``retry``); one whose failure it reported before is starting again,
    not failed, until it reports otherwise. ``since`` is when agentd last
    reported a change of a replica.
    """
    return replica.state == "failed" and since(replica.id) >= deployed


def deployment_status(
    name: str,
    stored: StoredDeployment,
    spec: DeploymentSpec,
    replicas: list[ReplicaInfo],
    *,
    holds: Mapping[str, int],
    stopped: Container[str],
    states: Mapping[str, ServiceState],
    failed: Mapping[tuple[str, int, str], str],
    waiting: Container[tuple[str, int, str]],
    deployed_at: float,
    since: Callable[[str], float],
    refusal: str,
    unrouted: Callable[[], bool],
) -> DeploymentStatus:
    """The status of deployment ``name`` (``stored``, its ``spec`` parsed, its
    scale ``holds``, ``stopped`` services and their rollout ``states``) and its
    ``replicas`` on the node.

    ``failed`` and ``waiting`` are the reconcile loop's services that gave up
    on, or wait for, their dependencies; ``refusal`` why a traffic holder
    refused the deployment's traffic (""), ``unrouted`` whether a replica in
    rotation is not yet in the traffic the holders hold.
    """
    services = []
    for svc_name in start_order(spec):
        svc = spec.services[svc_name]
        st = states.get(svc_name) or ServiceState(stored.revision, stored.revision)
        # The revision that serves: the new one once its rollout is done.
        current = st.serving if st.rollout else st.target
        mine = [r for r in replicas if r.service == svc_name and r.revision == current]
        desired = (
            0
            if (stored.removing or stored.stopped or svc_name in stopped)
            else desired_replicas(svc, holds.get(svc_name), st.adaptive)
        )
        if stored.removing or stored.stopped or svc_name in stopped:
            # What still runs of any revision, so `down` and `stop` can show it leaving.
            mine = [r for r in replicas if r.service == svc_name]
        running = sum(1 for r in mine if r.state == "running")
        healthy = sum(1 for r in mine if r.state == "running" and r.health in ("healthy", "none"))
        key = (name, stored.revision, svc_name)
        message = failed.get(key, "") or st.message
        state: ServiceCondition
        if svc.rtype != "service":
            state = "running" if running else "pending"
        elif key in failed:
            state = "failed"
        elif mine and all(failed_since_deploy(r, deployed_at, since) for r in mine):
            state = "failed"  # every replica failed to start; agentd keeps retrying
            message = mine[0].message
        elif stored.removing or stored.stopped or svc_name in stopped:
            state = "stopped"
        elif key in waiting:
            state = "waiting"
            deps = ", ".join(f"{d.service} ({d.condition})" for d in svc.depends)
            message = message or f"waiting for {deps}"
        elif st.rollout == "running":
            state = "updating"
            fresh = [
                r
                for r in replicas
                if r.service == svc_name
                and r.revision == st.target
                and r.state == "running"
                and r.health in IN_ROTATION
            ]
            message = (
                f"rolling out revision {st.target}: {len(fresh)} of {desired} new "
                f"replicas healthy, revision {st.serving} serving"
            )
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
                revision=current,
                rollout=st.rollout,
                stopping=sum(
                    1 for r in replicas if r.service == svc_name and r.state == "stopping"
                ),
            )
        )
    message = ""
    overall: DeploymentState
    if stored.removing:
        overall = "removing"
        left = len({r.id for r in replicas})
        message = f"{left} replica{'s' if left != 1 else ''} still stopping"
    elif refusal:
        overall = "failed"
        message = refusal
    elif stored.stopped:
        overall = "stopped"
    elif any(s.state == "failed" for s in services):
        overall = "failed"
    elif all(s.state in ("running", "pending", "stopped") for s in services):
        overall = "running"
        if unrouted():
            # Healthy, not yet in DNS and the proxy: a first request would miss.
            overall = "deploying"
            message = "routing traffic to the new replicas"
    elif any(s.state in ("waiting", "starting", "updating") for s in services):
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
        message=message,
    )
