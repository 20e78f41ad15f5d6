"""The REST API's route table: each route's method, path, role and wire types.

Every handler of ``/api/v1`` is declared with :func:`route`, which records a
:class:`RouteSpec` on the handler and in :data:`ROUTES`. The one table serves
three readers: the application registers its handlers from it, the auth
middleware reads the matched route's spec to decide who may call it (roles
are checked in one place, never inside handlers), and the OpenAPI document
is generated from it and the ``shared.wire`` types it names.

Roles are ordered: a viewer reads; an operator also deploys, scales, execs
and triggers jobs; an admin also manages secrets, tokens and images. A token
scoped to deployments sees and touches only those: a route that acts on one
deployment names the path parameter that holds it (``deployment=``), and
listings filter by :func:`can_see`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

from aiohttp import web

API_PREFIX = "/api/v1"
# a job id in a path: digits that fit the bus's unsigned 64 bits (an id out of that range
# cannot be sent to the daemon, so it is no route: 404)
JOB_ID = "{id:[0-9]{1,19}}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Method = Literal["GET", "POST", "PUT", "DELETE"]


class Role(IntEnum):
    """What a token may do; each role may do everything the ones below it may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        return cls[text.upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name, its role and the deployments it is
    limited to (None: every deployment)."""

    name: str
    role: Role
    deployments: frozenset[str] | None = None

    def may_see(self, deployment: str) -> bool:
        return self.deployments is None or deployment in self.deployments


# the request key the auth middleware stores the caller's Principal under
PRINCIPAL_KEY = web.RequestKey("principal", Principal)


@dataclass(frozen=True)
class RouteSpec:
    """One route of the API, as the middleware and the OpenAPI generator read it.

    ``path`` is relative to :data:`API_PREFIX` and uses aiohttp's ``{name}``
    placeholders. ``deployment`` names the path parameter (or, with a ``?``
    prefix, the query parameter) holding the deployment the route acts on, so
    a scoped token is refused with 404 for any other. ``body`` and ``returns``
    are ``shared.wire`` types (or builtins of them) for the OpenAPI document;
    ``content`` says what a non-JSON reply is (``text/event-stream``,
    ``text/plain``, ``application/yaml``, ...).
    """

    method: Method
    path: str
    role: Role
    summary: str
    deployment: str | None = None
    body: Any = None
    body_content: str = "application/json"
    returns: Any = None
    content: str = "application/json"
    status: int = 200
    query: dict[str, str] = field(default_factory=dict)  # name -> one-line description
    tags: tuple[str, ...] = ()

    @property
    def full_path(self) -> str:
        return API_PREFIX + self.path


ROUTES: list[RouteSpec] = []

_SPEC_ATTRIBUTE = "__zlayer_route__"


def route(
    method: Method,
    path: str,
    *,
    role: Role,
    summary: str,
    **details: Any,
) -> Callable[[Handler], Handler]:
    """Declare a handler as the route ``method path`` (relative to /api/v1)."""

    def declare(handler: Handler) -> Handler:
        spec = RouteSpec(method=method, path=path, role=role, summary=summary, **details)
        setattr(handler, _SPEC_ATTRIBUTE, spec)
        ROUTES.append(spec)
        _HANDLERS[(method, path)] = handler
        return handler

    return declare


_HANDLERS: dict[tuple[str, str], Handler] = {}


def route_spec(request: web.Request) -> RouteSpec | None:
    """The spec of the route a request matched; None outside /api/v1 (health, docs)."""
    handler = request.match_info.handler
    return getattr(handler, _SPEC_ATTRIBUTE, None)


def add_routes(app: web.Application) -> None:
    """Register every declared route's handler on ``app``."""
    for spec in ROUTES:
        app.router.add_route(spec.method, spec.full_path, _HANDLERS[(spec.method, spec.path)])


def principal(request: web.Request) -> Principal:
    """The caller, as the auth middleware found it."""
    return request[PRINCIPAL_KEY]


def can_see(request: web.Request, deployment: str) -> bool:
    """Whether the caller's token reaches ``deployment`` (listings filter by it)."""
    return principal(request).may_see(deployment)
