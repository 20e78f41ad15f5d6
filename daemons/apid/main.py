"""Entry point, bus object and HTTP server of zlayer-apid.

apid is the REST API (``/api/v1``, ``daemons.apid.app``): a gateway that
calls the other daemons over the bus as zlayerctl does, for callers holding a
bearer token. It also answers the probes a load balancer or orchestrator
asks: ``GET /health/live`` (the process serves HTTP) and ``GET
/health/ready`` (it can reach the daemons over the bus).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Annotated, Literal

from aiohttp import web
from msgspec import Meta

from daemons.apid.tokens import TOKEN_STORE_KEY, TokenMethods, TokenStore
from shared.bus import DAEMONS, DAEMONS_BY_NAME
from shared.clients import daemon_client
from shared.config import DaemonSettings, invalid
from shared.daemon import Daemon, daemon_members, main_for

PROBE_TIMEOUT = 2.0
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ApiSettings(DaemonSettings, kw_only=True):
    # the address the REST API listens on: this node only, until the API has
    # TLS (a bind to every address would send tokens in the clear)
    http_bind: str = "127.0.0.1"
    # REST API port; 0 picks a free one
    http_port: Annotated[int, Meta(ge=0, le=65535)] = 3669
    # "token": every /api/v1 route needs a bearer token; "none" (tests only,
    # refused unless bound to loopback): every caller is the admin "local"
    auth: Literal["token", "none"] = "token"
    # the largest request body read into memory (a spec, a JSON request)
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024
    # the largest build context POST /build takes, as sent and once unpacked
    # (spooled to apid's state directory, not held in memory)
    max_build_context_bytes: Annotated[int, Meta(ge=1024 * 1024)] = 2 * 1024 * 1024 * 1024
    # requests a second each token may make on average, and in a burst (0: no limit)
    rate_per_second: Annotated[float, Meta(ge=0)] = 50.0
    rate_burst: Annotated[int, Meta(ge=1)] = 100

    def __post_init__(self) -> None:
        if self.auth == "none" and self.http_bind not in LOOPBACK:
            raise invalid("auth", '"none" is for tests on 127.0.0.1 only; set http_bind to it')


class ApiService(TokenMethods):
    version, status = daemon_members()

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon


class ApiDaemon(Daemon):
    info = DAEMONS_BY_NAME["apid"]
    settings_class = ApiSettings

    def make_service(self) -> ApiService:
        self.service = ApiService(self)
        return self.service

    async def start(self) -> None:
        from daemons.apid.app import make_app
        from daemons.apid.base import Api

        settings = self.settings
        assert isinstance(settings, ApiSettings)
        assert self.bus is not None
        # the store serves the token routes and CreateToken in either auth mode
        store = await asyncio.to_thread(self._open_tokens)
        self.service.token_store = store
        state = Api(
            bus=self.bus,
            node_name=socket.gethostname(),
            address=settings.http_bind,
            own_status=self.status,
            max_build_context_bytes=settings.max_build_context_bytes,
        )

        def setup_auth(app: web.Application) -> None:
            from daemons.apid import auth

            authenticator = auth.Authenticator(
                store.signing_key.public_key(),
                store,
                rate_per_second=settings.rate_per_second,
                burst=settings.rate_burst,
            )
            auth.install(app, authenticator)

        app = make_app(
            state,
            auth=settings.auth,
            max_body_bytes=settings.max_body_bytes,
            setup_auth=setup_auth,
            readiness=self._ready,
        )
        app[TOKEN_STORE_KEY] = store
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.http_bind, settings.http_port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else settings.http_port
        self.detail = f"REST API on {settings.http_bind}:{self.http_port}"
        if settings.auth == "none":
            self.log.warning("auth = none: every request is served as the admin 'local'")
        self.log.info("%s", self.detail)

    def _open_tokens(self) -> TokenStore:
        from shared.nodekey import NodeKey

        key = NodeKey.load(self.paths)
        state_dir = self.paths.daemon_state("apid")
        state_dir.mkdir(parents=True, exist_ok=True)
        return TokenStore.open(state_dir, key.signing_key())

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _ready(self, _request: web.Request) -> web.Response:
        """Ready when every daemon answers Status over the bus."""
        results = await asyncio.gather(*(self._probe(info.name) for info in DAEMONS))
        daemons = dict(results)
        ready = all(state == "running" for state in daemons.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "daemons": daemons},
            status=200 if ready else 503,
        )

    async def _probe(self, name: str) -> tuple[str, str]:
        if name == self.info.name:
            return name, self.state
        if self.bus is None:
            return name, "unreachable"
        try:
            status = await asyncio.wait_for(daemon_client(name, self.bus).status(), PROBE_TIMEOUT)
        except Exception:  # unreachable daemon: its name has no owner or it hangs
            return name, "unreachable"
        return name, status.state


def main() -> None:
    main_for(ApiDaemon)
