"""The node: its containers, events, daemons, overlay network, proxy routes, operations.

Each route is the bus call of the matching read command (``zlayerctl ps
--containers``, ``status``, ``dns``, ``routes``, ...), or of the job a write
command follows (``/operations``: schedd's and registryd's jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from sdbus import DbusFailedError

from daemons.apid.base import api, reply, visible
from daemons.apid.problems import ApiProblem
from daemons.apid.routes_deployments import EVENTS_QUERY, events_limit
from daemons.apid.routing import JOB_ID, Role, principal, route
from daemons.apid.streams import send_events, wants_stream
from shared.bus import DAEMONS
from shared.clients import JobsDaemonClient, daemon_client
from shared.wire import decode, encode
from shared.wire.agent import ReplicaInfo
from shared.wire.api import NodeInfo
from shared.wire.daemon import DaemonStatus
from shared.wire.jobs import JobInfo
from shared.wire.overlay import NetworkInfo
from shared.wire.scheduler import Event
from shared.wire.traffic import DnsRecord, RouteInfo, ServiceStats

STATUS_TIMEOUT = 2.0
OPERATION = "/operations/{daemon:scheduler|registry}/" + JOB_ID


@route(
    "GET",
    "/containers",
    role=Role.VIEWER,
    summary="Every replica on the node (ListReplicas)",
    returns=list[ReplicaInfo],
    tags=("containers",),
)
async def containers(request: web.Request) -> web.StreamResponse:
    clients = api(request)
    try:  # every node's replicas in a cluster, from schedd
        found = await clients.scheduler.cluster_replicas()
    except DbusFailedError:  # a schedd without the method, or down: this node's, from agentd
        found = await clients.agent.list_replicas()
    return reply(visible(request, found))


@route(
    "GET",
    "/events",
    role=Role.VIEWER,
    summary="The node's events: the last ones of each deployment (ListEvents), or a stream",
    returns=list[Event],
    query=EVENTS_QUERY,
    tags=("events",),
)
async def events(request: web.Request) -> web.StreamResponse:
    scheduler = api(request).scheduler
    caller = principal(request)
    if wants_stream(request):

        async def source() -> AsyncIterator[tuple[str, object]]:
            async for event in scheduler.events():
                if caller.may_see(event.deployment):
                    yield event.kind, event

        return await send_events(request, source())
    limit = events_limit(request)
    names = [d.name for d in await scheduler.list_deployments() if caller.may_see(d.name)]
    listed = await asyncio.gather(*(scheduler.list_events(name, limit) for name in names))
    merged = sorted((e for found in listed for e in found), key=lambda e: e.time)
    return reply(merged[-limit:])


async def _statuses(request: web.Request) -> list[DaemonStatus]:
    """Each daemon's Status, asked at once; a daemon that does not answer is left out."""
    state = api(request)

    async def ask(name: str) -> DaemonStatus | None:
        if name == "apid":
            return state.own_status()
        with contextlib.suppress(Exception):
            return await asyncio.wait_for(daemon_client(name, state.bus).status(), STATUS_TIMEOUT)
        return None

    found = await asyncio.gather(*(ask(info.name) for info in DAEMONS))
    return [status for status in found if status is not None]


async def _node(request: web.Request) -> NodeInfo:
    state = api(request)
    statuses = await _statuses(request)
    healthy = len(statuses) == len(DAEMONS) and all(s.state == "running" for s in statuses)
    return NodeInfo(
        name=state.node_name,
        address=state.address,
        version=state.own_status().version,
        state="ready" if healthy else "degraded",
        daemons=statuses,
    )


@route(
    "GET",
    "/nodes",
    role=Role.VIEWER,
    summary="The cluster's nodes (this node)",
    returns=list[NodeInfo],
    tags=("nodes",),
)
async def nodes(request: web.Request) -> web.StreamResponse:
    return reply([await _node(request)])


@route(
    "GET",
    "/nodes/{name}",
    role=Role.VIEWER,
    summary="One node",
    returns=NodeInfo,
    tags=("nodes",),
)
async def node(request: web.Request) -> web.StreamResponse:
    name, own = request.match_info["name"], api(request).node_name
    if name != own:
        raise ApiProblem(404, f"there is no node named {name} (this node is {own})")
    return reply(await _node(request))


@route(
    "GET",
    "/daemons",
    role=Role.VIEWER,
    summary="The node's daemons, as `zlayerctl status` shows them (Status); one that does not "
    "answer is left out",
    returns=list[DaemonStatus],
    tags=("nodes",),
)
async def daemons(request: web.Request) -> web.StreamResponse:
    return reply(await _statuses(request))


@route(
    "GET",
    "/overlay/status",
    role=Role.VIEWER,
    summary="The node network (GetNetwork)",
    returns=NetworkInfo,
    tags=("network",),
)
async def overlay_status(request: web.Request) -> web.StreamResponse:
    return reply(await api(request).overlay.get_network())


@route(
    "GET",
    "/overlay/dns",
    role=Role.VIEWER,
    summary="The service DNS records (ListRecords)",
    returns=list[DnsRecord],
    tags=("network",),
)
async def overlay_dns(request: web.Request) -> web.StreamResponse:
    found = await api(request).overlay.list_records()
    return reply(visible(request, found))


@route(
    "GET",
    "/proxy/routes",
    role=Role.VIEWER,
    summary="The proxy's routes (ListRoutes)",
    returns=list[RouteInfo],
    tags=("network",),
)
async def proxy_routes(request: web.Request) -> web.StreamResponse:
    found = await api(request).proxy.list_routes()
    return reply(visible(request, found))


@route(
    "GET",
    "/proxy/stats",
    role=Role.VIEWER,
    summary="Each service's traffic counters (ServiceStats)",
    returns=list[ServiceStats],
    tags=("network",),
)
async def proxy_stats(request: web.Request) -> web.StreamResponse:
    found = await api(request).proxy.service_stats()
    return reply(visible(request, found))


def _operation_client(request: web.Request) -> tuple[JobsDaemonClient, int]:  # type: ignore[type-arg]
    state = api(request)
    client = state.scheduler if request.match_info["daemon"] == "scheduler" else state.registry
    return client, int(request.match_info["id"])


async def _visible_operation(request: web.Request) -> tuple[JobsDaemonClient, JobInfo]:  # type: ignore[type-arg]
    """The operation's client and JobInfo; 404 for a token scoped to other deployments.

    schedd's jobs name their deployment as their target; registryd's (pulls,
    pushes, builds) belong to no deployment, so a scoped token sees none.
    """
    client, job_id = _operation_client(request)
    info = await client.get_job(job_id)
    caller = principal(request)
    if caller.deployments is not None and (
        request.match_info["daemon"] != "scheduler" or not caller.may_see(info.target)
    ):
        daemon = (
            "zlayer-schedd" if request.match_info["daemon"] == "scheduler" else "zlayer-registryd"
        )
        raise ApiProblem(
            404,
            f"job {job_id} is not known to {daemon} (it ended long ago, "
            "or the daemon restarted since)",
        )
    return client, info


@route(
    "GET",
    OPERATION,
    role=Role.VIEWER,
    summary="A long operation's state and progress (GetJob)",
    returns=JobInfo,
    tags=("operations",),
)
async def get_operation(request: web.Request) -> web.StreamResponse:
    _client, info = await _visible_operation(request)
    return reply(info)


@route(
    "GET",
    OPERATION + "/stream",
    role=Role.VIEWER,
    summary="A server-sent event stream of the operation's JobInfo at each change (event "
    "'progress'), ending with its final one (event 'done', 'failed' or 'cancelled')",
    returns=JobInfo,
    content="text/event-stream",
    tags=("operations",),
)
async def stream_operation(request: web.Request) -> web.StreamResponse:
    client, first = await _visible_operation(request)  # 404 before the stream opens

    async def source() -> AsyncIterator[tuple[str, object]]:
        if first.state != "running":
            yield first.state, first
            return
        changes: asyncio.Queue[str] = asyncio.Queue()

        async def started() -> int:
            return first.id

        # run_job updates one JobInfo in place: send a copy of each state
        follow = asyncio.create_task(
            client.run_job(started, on_progress=lambda info: changes.put_nowait(encode(info)))
        )
        last = "running"
        try:
            while not follow.done() or not changes.empty():
                getter = asyncio.create_task(changes.get())
                await asyncio.wait({getter, follow}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                info = decode(getter.result(), JobInfo)
                last = info.state
                yield info.state if info.state != "running" else "progress", info
            final = follow.result()
            if last == "running":  # the final state was not among the changes
                yield final.state, final
        finally:
            follow.cancel()

    return await send_events(request, source())


@route(
    "POST",
    OPERATION + "/cancel",
    role=Role.OPERATOR,
    summary="Cancel a running operation (CancelJob)",
    status=204,
    tags=("operations",),
)
async def cancel_operation(request: web.Request) -> web.StreamResponse:
    client, info = await _visible_operation(request)
    await client.cancel_job(info.id)
    return web.Response(status=204)
