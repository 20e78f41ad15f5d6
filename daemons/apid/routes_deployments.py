"""Deployments and their services: the bus calls ``zlayerctl up/down/ps/stop/scale`` make."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from daemons.apid.base import api, body_as, query_flag, query_int, refuse_nul, reply
from daemons.apid.problems import ApiProblem
from daemons.apid.routing import API_PREFIX, Role, can_see, principal, route
from daemons.apid.streams import send_events, wants_stream
from shared.wire.agent import ReplicaInfo
from shared.wire.api import DeployRequest, OperationRef, RolledBack, ScaleRequest, StopRequest
from shared.wire.scheduler import Deployed, DeploymentStatus, DeployPlan, Event, ServiceStatus

TAGS = ("deployments",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")
EVENTS_LIMIT = 100
MAX_EVENTS = 10_000
# the query of both event routes (a deployment's, the node's)
EVENTS_QUERY = {
    "limit": f"how many of the last events (default {EVENTS_LIMIT})",
    "follow": "true: a server-sent event stream of each new Event (also Accept: text/event-stream)",
}


def operation_accepted(daemon: str, job: int, value: object | None = None) -> web.Response:
    """202 with the operation to follow (or ``value``) and its URL in Location."""
    ref = OperationRef(daemon="scheduler" if daemon == "scheduler" else "registry", id=job)
    location = f"{API_PREFIX}/operations/{ref.daemon}/{ref.id}"
    return reply(ref if value is None else value, status=202, headers={"Location": location})


def events_limit(request: web.Request) -> int:
    """``?limit=`` of the event routes: how many of the last events to list."""
    return query_int(request, "limit", EVENTS_LIMIT, 1, MAX_EVENTS)


def no_deployment(name: str) -> ApiProblem:
    return ApiProblem(404, f"there is no deployment named {name}")


@route(
    "GET",
    "/deployments",
    role=Role.VIEWER,
    summary="List deployments (ListDeployments)",
    returns=list[DeploymentStatus],
    tags=TAGS,
)
async def list_deployments(request: web.Request) -> web.StreamResponse:
    found = await api(request).scheduler.list_deployments()
    return reply([d for d in found if can_see(request, d.name)])


@route(
    "POST",
    "/deployments",
    role=Role.OPERATOR,
    summary="Deploy a spec: its YAML as the body, or a JSON DeployRequest (Deploy, Plan)",
    body=DeployRequest,
    body_content="application/json|application/yaml",
    returns=Deployed,
    status=202,
    query={
        "dry_run": "true: answer the plan (DeployPlan, 200) and change nothing",
        "filename": "the spec's file name, for the locations in error messages (YAML body)",
    },
    tags=TAGS,
)
async def deploy(request: web.Request) -> web.StreamResponse:
    if request.content_type in YAML_TYPES:
        raw = await request.read()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise ApiProblem(400, "the spec is not UTF-8 text") from None
        wanted = DeployRequest(spec=text, filename=request.query.get("filename", ""))
        refuse_nul(wanted)
    else:
        wanted = await body_as(request, DeployRequest)
    filename = wanted.filename or "zlayer.yml"
    scheduler = api(request).scheduler
    plan: DeployPlan | None = None
    caller = principal(request)
    if query_flag(request, "dry_run") or caller.deployments is not None:
        plan = await scheduler.plan(wanted.spec, filename, wanted.env)
        if not caller.may_see(plan.deployment):
            raise no_deployment(plan.deployment)
        if query_flag(request, "dry_run"):
            return reply(plan)
    deployed = await scheduler.deploy(wanted.spec, filename, wanted.env)
    return operation_accepted("scheduler", deployed.job, deployed)


@route(
    "GET",
    "/deployments/{name}",
    role=Role.VIEWER,
    summary="A deployment's status (GetDeployment)",
    deployment="name",
    returns=DeploymentStatus,
    tags=TAGS,
)
async def get_deployment(request: web.Request) -> web.StreamResponse:
    return reply(await api(request).scheduler.get_deployment(request.match_info["name"]))


@route(
    "DELETE",
    "/deployments/{name}",
    role=Role.OPERATOR,
    summary="Remove a deployment (Down); follow the operation until it is gone",
    deployment="name",
    returns=OperationRef,
    status=202,
    tags=TAGS,
)
async def delete_deployment(request: web.Request) -> web.StreamResponse:
    job = await api(request).scheduler.down(request.match_info["name"])
    return operation_accepted("scheduler", job)


@route(
    "GET",
    "/deployments/{name}/spec",
    role=Role.VIEWER,
    summary="The deployment's stored spec, as written (GetSpec)",
    deployment="name",
    returns=str,
    content="application/yaml",
    tags=TAGS,
)
async def get_spec(request: web.Request) -> web.StreamResponse:
    text = await api(request).scheduler.get_spec(request.match_info["name"])
    return web.Response(text=text, content_type="application/yaml")


@route(
    "GET",
    "/deployments/{name}/events",
    role=Role.VIEWER,
    summary="A deployment's events: the last ones (ListEvents), or a stream (EventEmitted)",
    deployment="name",
    returns=list[Event],
    query=EVENTS_QUERY,
    tags=TAGS,
)
async def deployment_events(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    scheduler = api(request).scheduler
    if wants_stream(request):

        async def events() -> AsyncIterator[tuple[str, object]]:
            async for event in scheduler.events():
                if event.deployment == name:
                    yield event.kind, event

        return await send_events(request, events())
    return reply(await scheduler.list_events(name, events_limit(request)))


@route(
    "POST",
    "/deployments/{name}/rollback",
    role=Role.OPERATOR,
    summary=(
        "Roll back to the previous revision (Rollback): stores it again as a new revision and"
        " answers that revision (200, no operation: the rollout shows in the deployment's status)"
    ),
    deployment="name",
    returns=RolledBack,
    tags=TAGS,
)
async def rollback(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    revision = await api(request).scheduler.rollback(name)
    return reply(RolledBack(deployment=name, revision=revision))


@route(
    "POST",
    "/deployments/{name}/stop",
    role=Role.OPERATOR,
    summary="Stop a deployment's services, or one (Stop)",
    deployment="name",
    body=StopRequest,
    returns=OperationRef,
    status=202,
    tags=TAGS,
)
async def stop(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    wanted = StopRequest() if not raw.strip() else await body_as(request, StopRequest)
    if wanted.timeout < 0:
        raise ApiProblem(400, "timeout must be 0 seconds or more")
    job = await api(request).scheduler.stop(
        request.match_info["name"], wanted.service, wanted.timeout, wanted.force
    )
    return operation_accepted("scheduler", job)


async def _service(request: web.Request) -> ServiceStatus:
    dep, svc = request.match_info["dep"], request.match_info["svc"]
    status = await api(request).scheduler.get_deployment(dep)
    for service in status.services:
        if service.name == svc:
            return service
    names = ", ".join(s.name for s in status.services)
    raise ApiProblem(404, f"deployment {dep} has no service {svc} (services: {names})")


@route(
    "GET",
    "/deployments/{dep}/services",
    role=Role.VIEWER,
    summary="A deployment's services (GetDeployment)",
    deployment="dep",
    returns=list[ServiceStatus],
    tags=("services",),
)
async def list_services(request: web.Request) -> web.StreamResponse:
    status = await api(request).scheduler.get_deployment(request.match_info["dep"])
    return reply(status.services)


@route(
    "GET",
    "/deployments/{dep}/services/{svc}",
    role=Role.VIEWER,
    summary="One service's status (GetDeployment)",
    deployment="dep",
    returns=ServiceStatus,
    tags=("services",),
)
async def get_service(request: web.Request) -> web.StreamResponse:
    return reply(await _service(request))


@route(
    "GET",
    "/deployments/{dep}/services/{svc}/containers",
    role=Role.VIEWER,
    summary="A service's replicas (ListReplicas)",
    deployment="dep",
    returns=list[ReplicaInfo],
    tags=("services",),
)
async def service_containers(request: web.Request) -> web.StreamResponse:
    await _service(request)
    found = await api(request).agent.list_replicas(
        request.match_info["dep"], request.match_info["svc"]
    )
    return reply(found)


@route(
    "POST",
    "/deployments/{dep}/services/{svc}/scale",
    role=Role.OPERATOR,
    summary="Scale a service (Scale); follow the operation until it runs that many",
    deployment="dep",
    body=ScaleRequest,
    returns=OperationRef,
    status=202,
    tags=("services",),
)
async def scale(request: web.Request) -> web.StreamResponse:
    wanted = await body_as(request, ScaleRequest)
    if not 0 <= wanted.replicas <= 10_000:
        raise ApiProblem(400, "replicas must be between 0 and 10000")
    job = await api(request).scheduler.scale(
        request.match_info["dep"], request.match_info["svc"], wanted.replicas
    )
    return operation_accepted("scheduler", job)
