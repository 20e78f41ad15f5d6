"""Who may call what: every route of the REST API with every kind of token, on a real apid.

One real zlayer-apid on a private bus (no other daemon: a call it lets through
ends in the daemon's absence, 503, or the handler's own answer), its tokens
made over the bus as ``zlayerctl token create`` makes them. Each route in
``routing.ROUTES`` (every ``routes_*`` module imported, so the table is full)
is called with no token, a malformed one, an expired, a revoked, a viewer,
an operator, an admin and a token scoped to one deployment:

- no usable token: 401 with ``WWW-Authenticate: Bearer``;
- a role below the route's: 403; at or above it: anything but 401 and 403;
- a scoped token on a route naming another deployment: 404, the sentence of
  a deployment that does not exist; on its own deployment: what an unscoped
  token of the same role gets.

Also: the rate limit answers 429 with Retry-After, the access log names the
token and never holds its text, and a revocation holds from the next request.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

import daemons.apid
from daemons.apid.routing import ROUTES, Role, RouteSpec
from shared.busdaemon import PrivateBus
from shared.paths import Paths
from tests.api_client import Apid, mint_token, revoke_token, running_apid

OWN, OTHER = "web", "db"
# values for the path parameters the routes use; a deployment parameter gets OWN or OTHER
SAMPLES = {"svc": "api", "image": "busybox", "daemon": "scheduler", "id": "1"}
RATE = "rate_per_second = 1.0\nrate_burst = 200\n"


def _all_routes() -> list[RouteSpec]:
    for module in pkgutil.iter_modules(daemons.apid.__path__):
        if module.name.startswith("routes_"):
            importlib.import_module(f"daemons.apid.{module.name}")
    return list(ROUTES)


def _fill(spec: RouteSpec, deployment: str) -> str:
    """The route's URL path and query with sample values; ``deployment`` for its deployment."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == spec.deployment or (name in ("name", "dep") and spec.path.startswith("/deploy")):
            return deployment
        return SAMPLES.get(name, "x")

    # a placeholder may hold a pattern with braces of its own: {id:[0-9]{1,19}}
    path = re.sub(r"\{(\w+)(?::(?:[^{}]|\{[^{}]*\})*)?\}", value, spec.full_path)
    if spec.deployment and spec.deployment.startswith("?"):
        path += f"?{spec.deployment[1:]}={deployment}"
    return path


@dataclass(frozen=True)
class Answer:
    status: int
    challenge: str | None
    detail: str


async def _ask(session: aiohttp.ClientSession, base: str, spec: RouteSpec, path: str,
               token: str | None) -> Answer:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    # a body that decodes as nothing: a route that reads it answers 400 once let through
    async with session.request(
        spec.method, base + path, headers=headers, data=b"{}",
        timeout=aiohttp.ClientTimeout(total=30),
    ) as reply:  # fmt: skip
        detail = ""
        if reply.status >= 400 and reply.content_type == "application/problem+json":
            detail = (await reply.json(content_type=None)).get("detail", "")
        # a stream that was let through is not read: its status is the answer
        return Answer(reply.status, reply.headers.get("WWW-Authenticate"), detail)


@pytest.fixture
def apid(private_bus: PrivateBus, zlayer_prefix: Paths) -> Iterator[Apid]:
    with running_apid(private_bus, zlayer_prefix, RATE) as running:
        yield running


def test_every_route_with_every_kind_of_token(apid: Apid, private_bus: PrivateBus) -> None:
    routes = _all_routes()
    assert len(routes) >= 10, "the route table is nearly empty: are the route modules there?"
    address = private_bus.address
    tokens: dict[str, str | None] = {
        "none": None,
        "malformed": "not.a.jwt",
        "expired": mint_token(address, "expired", "admin", ttl_seconds=1),
        "revoked": mint_token(address, "revoked", "admin"),
        "viewer": mint_token(address, "viewer", "viewer"),
        "operator": mint_token(address, "operator", "operator"),
        "admin": mint_token(address, "admin", "admin"),
        "scoped": mint_token(address, "scoped", "admin", deployments=(OWN,)),
    }
    revoke_token(address, "revoked")
    time.sleep(1.2)  # the expired token's second has passed
    roles = {"viewer": Role.VIEWER, "operator": Role.OPERATOR, "admin": Role.ADMIN}

    async def walk() -> list[str]:
        wrong: list[str] = []
        async with aiohttp.ClientSession() as session:
            for spec in routes:
                what = f"{spec.method} {spec.path}"
                path = _fill(spec, OWN)
                answers = {
                    kind: await _ask(session, apid.url, spec, path, token)
                    for kind, token in tokens.items()
                }
                for kind in ("none", "malformed", "expired", "revoked"):
                    got = answers[kind]
                    if got.status != 401 or not (got.challenge or "").startswith("Bearer"):
                        wrong.append(f"{what} with {kind} token: {got}")
                for kind, role in roles.items():
                    got = answers[kind]
                    refused = got.status in (401, 403)
                    if refused != (role < spec.role) or (refused and got.status != 403):
                        wrong.append(f"{what} as {kind} ({spec.role.label} route): {got}")
                # scoped to OWN, with the admin role: as the admin there
                scoped, admin = answers["scoped"], answers["admin"]
                if scoped.status != admin.status:
                    wrong.append(f"{what} scoped to its own deployment: {scoped}, admin: {admin}")
                if spec.deployment:
                    other = await _ask(
                        session, apid.url, spec, _fill(spec, OTHER), tokens["scoped"]
                    )
                    if other != Answer(404, None, f"there is no deployment named {OTHER}"):
                        wrong.append(f"{what} scoped, another deployment: {other}")
        return wrong

    wrong = asyncio.run(walk())
    assert not wrong, "\n".join(wrong)


def test_rate_limit_access_log_and_revocation(apid: Apid, private_bus: PrivateBus) -> None:
    token = mint_token(private_bus.address, "busy", "viewer")
    path = "/api/v1/tokens"  # admin: the viewer is refused, quickly, after the rate check
    statuses = [apid.call("GET", path, token)[0] for _ in range(210)]
    assert statuses[0] == 403
    assert 429 in statuses, statuses
    status, body, headers = apid.call("GET", path, token)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert body["status"] == 429 and "busy" in body["detail"]
    # another token has its own bucket
    calm = mint_token(private_bus.address, "calm", "admin")
    status, body, _ = apid.call("GET", path, calm)
    assert status == 200
    assert {t["name"] for t in body} == {"busy", "calm"}

    # revoked: refused from the next request on
    revoke_token(private_bus.address, "calm")
    status, body, headers = apid.call("GET", path, calm)
    assert status == 401 and "revoked" in body["detail"]

    wanted = [
        (" GET /api/v1/tokens 200 ", " calm 127.0.0.1"),
        (" GET /api/v1/tokens 429 ", " busy "),
        (" GET /api/v1/tokens 401 ", " - 127.0.0.1"),
    ]
    deadline = time.monotonic() + 10  # apid's log writer writes a moment after the answer
    while True:
        log = apid.log.read_text()
        access = [line for line in log.splitlines() if "zlayer.apid.access" in line]
        missing = [w for w in wanted if not any(w[0] in ln and w[1] in ln for ln in access)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not missing, access
    for secret in (token, calm, token.rsplit(".", 1)[-1], calm.rsplit(".", 1)[-1]):
        assert secret not in log
    assert "Bearer" not in log and "Authorization" not in log


def test_public_routes_need_no_token(apid: Apid) -> None:
    for path in ("/health/live", "/api/v1/openapi.json", "/api/v1/docs"):
        status, _, _ = apid.call("GET", path)
        assert status == 200, path
    status, body, headers = apid.call("GET", "/api/v1/deployments")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["title"] == "Unauthorized" and "bearer token" in body["detail"]
