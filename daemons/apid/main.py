"""Entry point, bus object and HTTP server of zlayer-apid.

The REST API grows in later work; now it answers the probes a load balancer
or orchestrator asks: ``GET /health/live`` (the process serves HTTP) and
``GET /health/ready`` (it can reach the daemons over the bus).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from aiohttp import web
from msgspec import Meta

from shared.bus import DAEMONS, DAEMONS_BY_NAME, Api1
from shared.clients import daemon_client
from shared.config import DaemonSettings
from shared.daemon import Daemon, daemon_members, main_for

PROBE_TIMEOUT = 2.0


class ApiSettings(DaemonSettings, kw_only=True):
    # the address the REST API listens on: this node only, until the API has
    # authentication and TLS (a bind to every address would let anyone who
    # can reach the node call it)
    http_bind: str = "127.0.0.1"
    # REST API port; 0 picks a free one
    http_port: Annotated[int, Meta(ge=0, le=65535)] = 3669


class ApiService(Api1):
    version, status = daemon_members()

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon


class ApiDaemon(Daemon):
    info = DAEMONS_BY_NAME["apid"]
    settings_class = ApiSettings

    def make_service(self) -> ApiService:
        return ApiService(self)

    async def start(self) -> None:
        settings = self.settings
        assert isinstance(settings, ApiSettings)
        app = web.Application()
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.http_bind, settings.http_port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else settings.http_port
        self.detail = f"REST API on {settings.http_bind}:{self.http_port}"
        self.log.info("%s", self.detail)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _live(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

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
