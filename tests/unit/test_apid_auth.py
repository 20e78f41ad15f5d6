"""The auth middleware and the token store, on a real aiohttp server with a real token store.

The routes here are declared on a private table (not routing.ROUTES) so this
test stays independent of which API modules exist; the walk over every real
route is tests/integration/test_api_auth.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from daemons.apid import auth, routing
from daemons.apid.auth import Authenticator, RateLimiter
from daemons.apid.tokens import STATE_FILE, TokenStore
from shared.bus import AlreadyExistsError, InvalidArgumentError, NotFoundError
from shared.nodekey import NodeKey
from shared.wire.api import TokenCreate

KEY = NodeKey(b"k" * 32)


def _handler(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        caller = routing.principal(request)
        return web.json_response({"kind": kind, "caller": caller.name})

    return handle


# (method, path, role, deployment parameter)
TEST_ROUTES: list[tuple[routing.Method, str, routing.Role, str | None]] = [
    ("GET", "/t/things", routing.Role.VIEWER, None),
    ("POST", "/t/things", routing.Role.OPERATOR, None),
    ("DELETE", "/t/things", routing.Role.ADMIN, None),
    ("GET", "/t/deployments/{name}", routing.Role.VIEWER, "name"),
    ("POST", "/t/jobs", routing.Role.OPERATOR, "?deployment"),
]


def _declare(app: web.Application) -> None:
    # routing.route records each spec in ROUTES; these are test-only, so take them out again
    before = len(routing.ROUTES)
    for method, path, role, deployment in TEST_ROUTES:
        handler = routing.route(method, path, role=role, summary="t", deployment=deployment)(
            _handler(f"{method} {path}")
        )
        app.router.add_route(method, routing.API_PREFIX + path, handler)
    del routing.ROUTES[before:]


@asynccontextmanager
async def served(
    tmp_path: Path, rate: float = 0, burst: int = 100
) -> AsyncIterator[tuple[str, TokenStore]]:
    store = TokenStore.open(tmp_path, KEY.signing_key)
    app = web.Application()
    auth.install(app, Authenticator(KEY.verifying_key, store, rate_per_second=rate, burst=burst))

    async def live(_request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    app.router.add_get("/health/live", live)
    _declare(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", store
    finally:
        await runner.cleanup()


async def _call(
    base: str, method: str, path: str, token: str | None = None, header: str | None = None
) -> tuple[int, dict[str, Any], Any]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if header is not None:
        headers["Authorization"] = header
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, headers=headers) as response,
    ):
        body = await response.json(content_type=None)
        return response.status, dict(response.headers), body


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_roles_scope_and_public_routes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as (base, store):
            viewer = (await store.create(TokenCreate(name="v", role="viewer"))).token
            operator = (await store.create(TokenCreate(name="o", role="operator"))).token
            admin = (await store.create(TokenCreate(name="a", role="admin"))).token
            scoped = (
                await store.create(TokenCreate(name="s", role="operator", deployments=["web"]))
            ).token

            assert (await _call(base, "GET", "/health/live"))[0] == 200
            status, headers, body = await _call(base, "GET", "/api/v1/t/things")
            assert status == 401
            assert headers["WWW-Authenticate"] == "Bearer"
            assert headers["Content-Type"].startswith("application/problem+json")
            assert body["status"] == 401 and body["title"] and "bearer token" in body["detail"]

            expect = {
                ("GET", "/api/v1/t/things"): {viewer: 200, operator: 200, admin: 200},
                ("POST", "/api/v1/t/things"): {viewer: 403, operator: 200, admin: 200},
                ("DELETE", "/api/v1/t/things"): {viewer: 403, operator: 403, admin: 200},
            }
            for (method, path), by_token in expect.items():
                for token, wanted in by_token.items():
                    status, _, body = await _call(base, method, path, token)
                    assert status == wanted, (method, path, body)

            assert (await _call(base, "GET", "/api/v1/t/deployments/web", scoped))[0] == 200
            status, _, body = await _call(base, "GET", "/api/v1/t/deployments/db", scoped)
            assert status == 404 and body["detail"] == "there is no deployment named db"
            assert (await _call(base, "GET", "/api/v1/t/deployments/db", viewer))[0] == 200
            assert (await _call(base, "POST", "/api/v1/t/jobs?deployment=web", scoped))[0] == 200
            assert (await _call(base, "POST", "/api/v1/t/jobs?deployment=db", scoped))[0] == 404
            status, _, body = await _call(base, "GET", "/api/v1/t/things", admin)
            assert body == {"kind": "GET /t/things", "caller": "a"}

    run(scenario())


def test_bad_tokens_are_refused_with_a_sentence(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as (base, store):
            good = (await store.create(TokenCreate(name="v", role="viewer"))).token
            other_node = TokenStore(tmp_path / "other", NodeKey(b"o" * 32).signing_key)
            foreign = other_node.issue(TokenCreate(name="v", role="admin")).token
            expired = store.issue(
                TokenCreate(name="old", role="viewer", ttl_seconds=60), now=1000.0
            ).token
            for header in [
                "Bearer not-a-jwt",
                f"Bearer {foreign}",
                f"Bearer {expired}",
                f"Basic {good}",
                "Bearer",
                f"Bearer {good[:-4]}AAAA",
            ]:
                status, headers, body = await _call(base, "GET", "/api/v1/t/things", header=header)
                assert status == 401, header
                assert headers["WWW-Authenticate"].startswith("Bearer")
                assert good not in body["detail"] and "Traceback" not in body["detail"]
            status, _, body = await _call(base, "GET", "/api/v1/t/things", expired)
            assert "expired" in body["detail"]

            assert (await _call(base, "GET", "/api/v1/t/things", good))[0] == 200
            await store.remove("v")
            status, _, body = await _call(base, "GET", "/api/v1/t/things", good)
            assert status == 401 and "revoked" in body["detail"]

    run(scenario())


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path, rate=1, burst=3) as (base, store):
            token = (await store.create(TokenCreate(name="busy", role="viewer"))).token
            other = (await store.create(TokenCreate(name="calm", role="viewer"))).token
            statuses = [(await _call(base, "GET", "/api/v1/t/things", token))[0] for _ in range(5)]
            assert statuses[:3] == [200, 200, 200]
            assert 429 in statuses[3:]
            status, headers, body = await _call(base, "GET", "/api/v1/t/things", token)
            assert status == 429 and int(headers["Retry-After"]) >= 1
            assert "busy" in body["detail"]
            # the limit is per token
            assert (await _call(base, "GET", "/api/v1/t/things", other))[0] == 200

    run(scenario())


def test_access_log_names_the_token_never_its_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> list[str]:
        async with served(tmp_path) as (base, store):
            token = (await store.create(TokenCreate(name="logged", role="viewer"))).token
            with caplog.at_level(logging.INFO, logger="zlayer.apid.access"):
                await _call(base, "GET", "/api/v1/t/things", token)
                await _call(base, "POST", "/api/v1/t/things", token)
                await _call(base, "GET", "/health/live")
                await _call(base, "GET", "/api/v1/t/things", header="Bearer x.y.z")
            return [token]

    (token,) = asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "zlayer.apid.access"]
    assert len(lines) == 4
    assert lines[0].startswith("GET /api/v1/t/things 200 ") and " logged 127.0.0.1" in lines[0]
    assert lines[1].startswith("POST /api/v1/t/things 403 ") and " logged " in lines[1]
    assert lines[2].startswith("GET /health/live 200 ") and " - 127.0.0.1" in lines[2]
    assert lines[3].startswith("GET /api/v1/t/things 401 ") and " - 127.0.0.1" in lines[3]
    for line in lines:
        assert token not in line and "x.y.z" not in line and "Bearer" not in line


def test_store_keeps_records_but_never_the_token(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = TokenStore.open(tmp_path, KEY.signing_key)
        issued = await store.create(
            TokenCreate(name="ci", role="operator", deployments=["web", "api"], ttl_seconds=3600)
        )
        assert issued.info.deployments == ["api", "web"]
        assert issued.info.expires_at == pytest.approx(issued.info.created_at + 3600)
        with pytest.raises(AlreadyExistsError, match="already a token named ci"):
            store.issue(TokenCreate(name="ci", role="viewer"))
        with pytest.raises(InvalidArgumentError):
            store.issue(TokenCreate(name="../x", role="viewer"))
        with pytest.raises(InvalidArgumentError):
            store.issue(TokenCreate(name="x", role="viewer", ttl_seconds=0))
        with pytest.raises(NotFoundError, match="no token named nope"):
            store.revoke("nope")
        await store.remove("ci")
        # a revoked name may be used again, with a new jti
        again = await store.create(TokenCreate(name="ci", role="viewer"))

        path = tmp_path / STATE_FILE
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        text = path.read_text()
        assert issued.token not in text and again.token not in text
        reopened = TokenStore.open(tmp_path, KEY.signing_key)
        assert [(t.name, t.role, t.revoked) for t in reopened.list()] == [("ci", "viewer", False)]

    run(scenario())


def test_corrupt_store_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    store = TokenStore.open(tmp_path, KEY.signing_key)
    assert store.list() == []
    assert any(p.name.startswith(STATE_FILE + ".corrupt-") for p in tmp_path.iterdir())


def test_bucket_refills_over_time() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2, burst=2, clock=lambda: now[0])
    assert limiter.wait("t") == 0 and limiter.wait("t") == 0
    assert limiter.wait("t") == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.wait("t") == 0
    assert RateLimiter(rate=0, burst=1).wait("t") == 0


def test_tokens_outlive_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = TokenStore.open(tmp_path, KEY.signing_key)
        issued = await store.create(TokenCreate(name="a", role="admin"))
        # a restart: the store read back, the same node key
        again = TokenStore.open(tmp_path, KEY.signing_key)
        caller, _ = Authenticator(KEY.verifying_key, again).authenticate(f"Bearer {issued.token}")
        assert caller == routing.Principal("a", routing.Role.ADMIN)

    run(scenario())
