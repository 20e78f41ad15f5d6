"""Who may call the REST API: bearer tokens, roles, deployment scope, a rate limit, the access log.

Every route declared with ``daemons.apid.routing.route`` needs
``Authorization: Bearer <token>``; everything else (the health probes, the
OpenAPI document and its docs page, paths that match no route) is public,
since it describes and does not act.

A token is a JWT signed with EdDSA by the node's Ed25519 key
(``NodeKey.signing_key()``), with the claims ``sub`` (the token's name),
``role``, ``deployments`` (absent: every deployment), ``iat``, ``exp``
(absent: no expiry) and ``jti``. The signature alone is not enough: the
``jti`` must name a token in the store that is not revoked, looked up on
every request, so a revocation holds from the next request on. The role and
scope come from the store's record, which the signature ties to the token.

Roles and scope are checked here and nowhere else, from the matched route's
``RouteSpec``: a role below the route's -> 403; a token scoped to other
deployments than the one the route names -> 404, as if it did not exist
(a 403 would confirm the name). Each token has its own token bucket of
requests; an empty bucket answers 429 with ``Retry-After``.

Every request, public or not, answered or failed, is one line in the
journal: method, path, status, duration, the token's name (``-`` for none)
and the peer. Never the token nor the Authorization header.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from daemons.apid.problems import problem_for, problem_response
from daemons.apid.routing import PRINCIPAL_KEY, Principal, Role, RouteSpec, route_spec

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


ALGORITHM = "EdDSA"

access_log = logging.getLogger("zlayer.apid.access")


class TokenRecord(Protocol):
    """What the middleware needs of a stored token (daemons.apid.tokens.StoredToken)."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def deployments(self) -> list[str]: ...
    @property
    def expires(self) -> float | None: ...
    @property
    def revoked(self) -> bool: ...


class TokenLookup(Protocol):
    def by_jti(self, jti: str) -> TokenRecord | None: ...


class AuthError(Exception):
    """A request the middleware refuses: its status and the sentence for the caller."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


def _unauthorized(detail: str, error: str = "invalid_token") -> AuthError:
    # RFC 6750: a request without credentials gets a bare challenge; a bad token names the error
    challenge = "Bearer" if not error else f'Bearer error="{error}"'
    return AuthError(401, detail, {"WWW-Authenticate": challenge})


@dataclass
class TokenBucket:
    """``rate`` requests a second on average, up to ``burst`` at once."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 if a request may go now (and count it), else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class RateLimiter:
    """One bucket per token (by its jti); ``rate`` <= 0 turns the limit off."""

    rate: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def wait(self, key: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) > 10_000:
                self._forget_full(now)
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
        return bucket.take(now)

    def _forget_full(self, now: float) -> None:
        # a bucket refilled to its burst behaves as a new one: drop it
        for key, bucket in list(self.buckets.items()):
            if bucket.tokens + (now - bucket.updated) * bucket.rate >= bucket.burst:
                del self.buckets[key]


class Authenticator:
    """Turns an Authorization header into a Principal, or refuses it."""

    def __init__(
        self,
        verifying_key: Callable[[], Ed25519PublicKey],
        store: TokenLookup,
        *,
        rate_per_second: float = 50.0,
        burst: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._make_verifying_key = verifying_key
        self.store = store
        self.limiter = RateLimiter(rate_per_second, burst)
        self.clock = clock

    @functools.cached_property
    def verifying_key(self) -> Ed25519PublicKey:
        """Made with the first token checked (cryptography loads then)."""
        return self._make_verifying_key()

    def authenticate(self, header: str | None) -> tuple[Principal, str]:
        """(the caller, the token's jti) for a valid, current, unrevoked token."""
        import jwt

        if not header:
            raise _unauthorized(
                "this route needs a bearer token (Authorization: Bearer <token>); "
                "an admin makes one with `zlayerctl token create NAME --role viewer`",
                error="",
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized(
                "the Authorization header is not a bearer token; send 'Authorization: Bearer "
                "<token>'",
                error="invalid_request",
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.verifying_key,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "jti", "iat"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized(
                "the token has expired; ask an admin for a new one (`zlayerctl token create`)"
            ) from None
        except jwt.InvalidTokenError:
            raise _unauthorized(
                "the token is not valid here (malformed, or not signed by this node); "
                "use one `zlayerctl token create` made on this node"
            ) from None
        jti = str(claims["jti"])
        record = self.store.by_jti(jti)
        if record is None or record.name != claims.get("sub"):
            raise _unauthorized(
                "the token is not known to this node (its token store was reset); "
                "ask an admin for a new one"
            )
        if record.revoked:
            raise _unauthorized(f"the token {record.name} was revoked; ask an admin for a new one")
        if record.expires is not None and record.expires <= self.clock():
            raise _unauthorized(
                "the token has expired; ask an admin for a new one (`zlayerctl token create`)"
            )
        try:
            role = Role.parse(record.role)
        except KeyError:
            raise _unauthorized(f"the token {record.name} has an unknown role") from None
        scope = frozenset(record.deployments) if record.deployments else None
        return Principal(name=record.name, role=role, deployments=scope), jti

    def limit(self, jti: str, name: str) -> None:
        wait = self.limiter.wait(jti)
        if wait > 0:
            raise AuthError(
                429,
                f"the token {name} has made more than {self.limiter.burst} requests in a burst "
                f"(limit: {self.limiter.rate:g} a second); wait {math.ceil(wait)} s and retry",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )


def authorize(spec: RouteSpec, caller: Principal, request: web.Request) -> None:
    """Refuse a role below the route's (403) or a deployment outside the token's scope (404)."""
    if caller.role < spec.role:
        raise AuthError(
            403,
            f"this needs the {spec.role.label} role; the token {caller.name} is "
            f"{caller.role.label}",
        )
    if spec.deployment and caller.deployments is not None:
        name = deployment_of(spec, request)
        if name is not None and not caller.may_see(name):
            raise AuthError(404, f"there is no deployment named {name}")


def deployment_of(spec: RouteSpec, request: web.Request) -> str | None:
    """The deployment a route acts on: its path parameter, or ``?name`` a query parameter."""
    if not spec.deployment:
        return None
    if spec.deployment.startswith("?"):
        return request.query.get(spec.deployment[1:])
    return request.match_info.get(spec.deployment)


AUTHENTICATOR_KEY = web.AppKey("authenticator", Authenticator)


def install(app: web.Application, authenticator: Authenticator) -> None:
    """Put the middleware first on ``app`` (before any other may act on a request)."""
    app[AUTHENTICATOR_KEY] = authenticator
    if auth_middleware not in app.middlewares:
        app.middlewares.insert(0, auth_middleware)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    started = time.monotonic()
    name = "-"
    status = 500
    try:
        spec = route_spec(request)
        if spec is not None:
            authenticator = request.app.get(AUTHENTICATOR_KEY)
            if authenticator is None:
                # never serve a route unauthenticated because the setup was skipped
                raise AuthError(
                    503,
                    "the API's authentication is not set up; restart zlayer-apid",
                )
            caller, jti = authenticator.authenticate(request.headers.get("Authorization"))
            name = caller.name
            authenticator.limit(jti, name)
            authorize(spec, caller, request)
            request[PRINCIPAL_KEY] = caller
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except AuthError as refused:
        status = refused.status
        return problem_response(refused.status, refused.detail, headers=refused.headers)
    except web.HTTPException as http:
        status = http.status
        raise
    except Exception as exc:
        # the problem middleware outside answers it: log the status it will give
        answer = problem_for(exc)
        status = answer.status if answer is not None else 500
        raise
    finally:
        access_log.info(
            "%s %s %d %.1fms %s %s",
            request.method,
            request.rel_url.raw_path,
            status,
            (time.monotonic() - started) * 1000,
            name,
            request.remote or "-",
        )
