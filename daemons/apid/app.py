"""The REST API's aiohttp application: its middlewares, its clients and its routes.

One bus connection (the daemon's own) and one typed client per daemon serve
every request; handlers reach them through ``daemons.apid.base.api``. The routes are the
handlers declared with ``daemons.apid.routing.route`` in the ``routes_*``
modules imported below; the health probes and the OpenAPI document with its
docs page sit beside them without a token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

# each routes module declares its handlers in routing.ROUTES when imported (one line each)
import daemons.apid.routes_deployments
import daemons.apid.routes_images
import daemons.apid.routes_secrets
import daemons.apid.routes_system
import daemons.apid.routes_tokens
import daemons.apid.routes_workloads  # noqa: F401
from daemons.apid.base import API_KEY, DEFAULT_MAX_BODY, Api
from daemons.apid.problems import problem_middleware
from daemons.apid.routing import PRINCIPAL_KEY, Handler, Principal, Role, add_routes

LOCAL_ADMIN = Principal(name="local", role=Role.ADMIN)


@web.middleware
async def local_admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``auth = "none"`` (tests on 127.0.0.1 only): every caller is the admin "local"."""
    request[PRINCIPAL_KEY] = LOCAL_ADMIN
    return await handler(request)


def make_app(
    api_state: Api,
    *,
    auth: str = "token",
    max_body_bytes: int = DEFAULT_MAX_BODY,
    setup_auth: Callable[[web.Application], None] | None = None,
    readiness: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
) -> web.Application:
    """The application: problem documents outermost, then who the caller is, then routes."""
    app = web.Application(middlewares=[problem_middleware], client_max_size=max_body_bytes)
    app[API_KEY] = api_state
    if auth == "none":
        app.middlewares.append(local_admin_middleware)
    else:
        from daemons.apid import auth as auth_module

        app.middlewares.append(auth_module.auth_middleware)
        if setup_auth is not None:
            setup_auth(app)
    app.router.add_get("/health/live", _live)
    if readiness is not None:
        app.router.add_get("/health/ready", readiness)
    add_routes(app)
    from daemons.apid.openapi import add_document_routes

    add_document_routes(app)
    return app


async def _live(_request: web.Request) -> web.Response:
    return web.json_response({"status": "live"})
