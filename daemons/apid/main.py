"""Entry point, bus object and HTTP server of zlayer-apid.

apid is the REST API (``/api/v1``, ``daemons.apid.app``): a gateway that
calls the other daemons over the bus as zlayerctl does, for callers holding a
bearer token. It also answers the probes a load balancer or orchestrator
asks: ``GET /health/live`` (the process serves HTTP) and ``GET
/health/ready`` (it can reach the daemons over the bus).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from typing import Annotated, Literal

from aiohttp import web
from msgspec import Meta

from daemons.apid.tokens import TOKEN_STORE_KEY, TokenMethods, TokenStore
from shared.bus import DAEMONS, DAEMONS_BY_NAME
from shared.clients import daemon_client
from shared.config import DaemonSettings, invalid
from shared.daemon import EX_CONFIG, Daemon, daemon_members, main_for
from shared.nodekey import NodeKeyError

PROBE_TIMEOUT = 2.0


class TlsFilesError(RuntimeError):
    """The configured certificate or key cannot be used, in one sentence."""


LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ApiSettings(DaemonSettings, kw_only=True):
    # the address the REST API listens on. Plain HTTP is served on loopback
    # only (tokens would cross the network in the clear); any other address
    # needs tls_cert_file and tls_key_file.
    http_bind: str = "127.0.0.1"
    # PEM files of the API's TLS certificate (chain) and its private key: with
    # both set the API speaks HTTPS only
    tls_cert_file: str = ""
    tls_key_file: str = ""
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
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise invalid(
                "tls_cert_file", "set tls_cert_file and tls_key_file together, or neither"
            )
        if not self.tls_cert_file and self.http_bind not in LOOPBACK:
            raise invalid(
                "http_bind",
                f"plain HTTP is served on 127.0.0.1 only; to serve the API on {self.http_bind}, "
                "set tls_cert_file and tls_key_file to its certificate and key",
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)


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
        try:
            store = await asyncio.to_thread(self._open_tokens)
            tls = await asyncio.to_thread(self._tls_context, settings) if settings.tls else None
        except (NodeKeyError, TlsFilesError) as exc:
            self.log.error("%s", exc)
            raise SystemExit(EX_CONFIG) from None  # restarting will not help
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
                lambda: store.signing_key.public_key(),
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
        site = web.TCPSite(self._runner, settings.http_bind, settings.http_port, ssl_context=tls)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else settings.http_port
        self.detail = f"REST API on {settings.http_bind}:{self.http_port}"
        if tls is not None:
            self.detail += " (HTTPS)"
        if settings.auth == "none":
            self.log.warning("auth = none: every request is served as the admin 'local'")
        self.log.info("%s", self.detail)

    def _open_tokens(self) -> TokenStore:
        from shared.nodekey import NodeKey

        key = NodeKey.load(self.paths)
        state_dir = self.paths.daemon_state("apid")
        state_dir.mkdir(parents=True, exist_ok=True)
        return TokenStore.open(state_dir, key.signing_key)

    @staticmethod
    def _tls_context(settings: ApiSettings) -> ssl.SSLContext:
        """The server context of the configured certificate and key (TLS 1.2 at least)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for path in (settings.tls_cert_file, settings.tls_key_file):
            if not os.path.exists(path):  # ssl's own error does not say which file
                raise TlsFilesError(
                    f"the API's TLS file {path} does not exist; "
                    "fix tls_cert_file and tls_key_file in apid.toml"
                )
        try:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFilesError(
                f"cannot use the API's TLS certificate {settings.tls_cert_file} with the key "
                f"{settings.tls_key_file} ({getattr(exc, 'strerror', None) or exc}); "
                "check that both are PEM files and that the key is the certificate's"
            ) from None
        return context

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
