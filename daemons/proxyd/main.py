"""Entry point and bus object of zlayer-proxyd.

The daemon opens the HTTP and HTTPS listeners on start (serving the routes
it persisted, so a restart serves at once), applies schedd's pushes
(``SetTraffic``), opens and closes the L4 listeners those name, runs the L4
health checks, and sweeps idle connections once a second.

A listener that cannot bind (the port is taken) does not stop the daemon:
it reports ``degraded`` with the reason and tries again every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl

from pydantic import ValidationError
from sdbus import dbus_method_async_override

from daemons.proxyd.exchange import ProxyCore
from daemons.proxyd.http1 import ClientConnection, Listener
from daemons.proxyd.routes import Route, RouteError, Routes
from daemons.proxyd.settings import ProxySettings
from daemons.proxyd.stream import TcpEndpoint, UdpEndpoint, health_loop
from daemons.proxyd.tls import L7_ALPN, CertificateStore, ServerTls, TlsConfigError
from shared.bus import (
    DAEMONS_BY_NAME,
    ConflictError,
    InvalidArgumentError,
    Proxy1,
    UnavailableError,
)
from shared.daemon import EX_CONFIG, Daemon, daemon_members, main_for
from shared.models import SyncResult
from shared.paths import Paths
from shared.traffic import DeploymentTraffic, TrafficViews
from shared.views import HeldGeneration, apply_views, refused

REBIND_INTERVAL = 5.0
SWEEP_INTERVAL = 1.0
BACKLOG = 1024


class ProxyService(Proxy1):
    version, status = daemon_members()

    def __init__(self, daemon: ProxyDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    @dbus_method_async_override()
    async def set_traffic(self, deployment: str, traffic: str) -> None:
        await self.daemon.set_traffic(deployment, traffic)

    @dbus_method_async_override()
    async def sync_traffic(self, views: str) -> str:
        return (await self.daemon.sync_traffic(views)).model_dump_json()

    @dbus_method_async_override()
    async def list_routes(self) -> str:
        daemon = self.daemon
        infos = daemon.routes.route_infos(
            daemon.listen_string(daemon.http_port),
            daemon.listen_string(daemon.https_port),
            daemon.settings.listen_addresses,
        )
        return json.dumps([info.model_dump(mode="json") for info in infos])

    @dbus_method_async_override()
    async def service_stats(self) -> str:
        return json.dumps([s.model_dump(mode="json") for s in self.daemon.routes.stats()])


class ProxyDaemon(Daemon):
    info = DAEMONS_BY_NAME["proxyd"]
    holds_view = True
    settings_class = ProxySettings
    settings: ProxySettings

    def __init__(self, settings: ProxySettings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.routes = Routes(paths.daemon_state(self.info.name))
        self.held = HeldGeneration(paths.daemon_state(self.info.name))
        self._sync_lock = asyncio.Lock()
        self.http_port = 0
        self.https_port = 0
        self.servers: dict[str, list[asyncio.Server]] = {"http": [], "https": []}
        self.bind_errors: dict[str, str] = {}
        self.tcp: dict[int, TcpEndpoint] = {}
        self.udp: dict[int, list[UdpEndpoint]] = {}
        self.health: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self.core: ProxyCore | None = None
        self.l7_tls: ServerTls | None = None
        self.l4_tls: ServerTls | None = None
        self.plain: Listener | None = None
        self.secure: Listener | None = None

    def make_service(self) -> ProxyService:
        return ProxyService(self)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        settings = self.settings
        state_dir = self.paths.daemon_state(self.info.name)
        try:
            certificates = await asyncio.to_thread(CertificateStore.load, settings, state_dir)
        except TlsConfigError as exc:
            self.log.error("%s", exc)
            raise SystemExit(EX_CONFIG) from None
        if certificates.self_signed:
            self.log.info(
                "no TLS certificate configured; serving a self-signed one for development "
                "(set tls_cert_dir or tls_certificates in %s)",
                self.paths.daemon_config(self.info.name),
            )
        self.l7_tls = certificates.server_context(L7_ALPN)
        self.l4_tls = certificates.server_context(None)
        for warning in await asyncio.to_thread(self.routes.load):
            self.log.warning("%s", warning)
        if not settings.access_log:
            logging.getLogger("zlayer.proxyd.access").disabled = True
        self.core = ProxyCore(settings, self.routes)
        self.plain = Listener(self.core, secure=False)
        self.secure = Listener(self.core, secure=True)
        await self._bind_listeners()
        try:
            await self._sync_streams()
        except OSError as exc:
            self.log.error("%s", exc)
        self._restart_health_checks()
        self.tasks.append(asyncio.create_task(self._sweep(), name="sweep"))
        if self.bind_errors:
            self.tasks.append(asyncio.create_task(self._rebind(), name="rebind"))
        asyncio.get_running_loop().call_soon(self._refresh_status)
        self.log.info(
            "listening: http on %s, https on %s; %d routes from %d saved deployments",
            self.listen_string(self.http_port) or "(not bound)",
            self.listen_string(self.https_port) or "(not bound)",
            len(self.routes.table.l7) + len(self.routes.table.l4),
            len(self.routes.deployments),
        )

    async def stop(self) -> None:
        for task in [*self.tasks, *self.health.values()]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for servers in self.servers.values():
            for server in servers:
                server.close()
        for listener in (self.plain, self.secure):
            if listener is not None:
                for connection in list(listener.connections):
                    connection.close()
        for endpoint in self.tcp.values():
            endpoint.close()
            endpoint.abort_all()
        for endpoints in self.udp.values():
            for udp in endpoints:
                udp.abort_all()
                udp.close()
        if self.core is not None:
            self.core.pool.close_all()
            for task in list(self.core.tasks):
                task.cancel()
        await asyncio.sleep(0)

    # ------------------------------------------------------------ listeners

    def listen_string(self, port: int) -> str:
        if not port:
            return ""
        return ",".join(f"{address}:{port}" for address in self.settings.listen_addresses)

    async def reload(self) -> None:
        """SIGHUP (``systemctl reload zlayer-proxyd``): read the certificates again.

        New handshakes get the new ones; established connections keep theirs.
        Files that cannot be used leave the old certificates serving.
        """
        settings = self.settings
        state_dir = self.paths.daemon_state(self.info.name)
        try:
            certificates = await asyncio.to_thread(CertificateStore.load, settings, state_dir)
            for tls in (self.l7_tls, self.l4_tls):
                if tls is not None:
                    await asyncio.to_thread(tls.reload, certificates)
        except (TlsConfigError, ssl.SSLError, OSError) as exc:
            self.log.error("certificates not reloaded, the old ones still serve: %s", exc)
            return
        names = sorted({n for _, _, found in certificates.pairs for n in found})
        self.log.info(
            "reloaded %d certificate%s (%s)",
            len(certificates.pairs),
            "" if len(certificates.pairs) == 1 else "s",
            ", ".join(names) or "no names",
        )

    async def _bind_listeners(self) -> None:
        settings = self.settings
        if not self.servers["http"]:
            self.http_port = await self._bind("http", settings.http_port, None)
        if not self.servers["https"]:
            assert self.l7_tls is not None  # start() made it
            self.https_port = await self._bind("https", settings.https_port, self.l7_tls.context)

    async def _bind(self, name: str, port: int, tls: ssl.SSLContext | None) -> int:
        loop = asyncio.get_running_loop()
        listener = self.secure if tls is not None else self.plain
        assert listener is not None
        servers: list[asyncio.Server] = []
        try:
            for address in self.settings.listen_addresses:
                server = await loop.create_server(
                    lambda: ClientConnection(listener),
                    address,
                    port,
                    ssl=tls,
                    reuse_address=True,
                    backlog=BACKLOG,
                )
                servers.append(server)
                if port == 0:
                    # The first address chose a free port; the others share it.
                    port = int(server.sockets[0].getsockname()[1])
        except OSError as exc:
            for server in servers:
                server.close()
            self.bind_errors[name] = (
                f"cannot listen for {name} on port {port} ({exc.strerror or exc}); "
                f"free the port or set {name}_port in {self.paths.daemon_config(self.info.name)}"
            )
            self.log.error("%s", self.bind_errors[name])
            return 0
        self.bind_errors.pop(name, None)
        self.servers[name] = servers
        return port

    async def _rebind(self) -> None:
        while self.bind_errors:
            await asyncio.sleep(REBIND_INTERVAL)
            await self._bind_listeners()
            self._refresh_status()
        self.log.info(
            "listening: http on %s, https on %s",
            self.listen_string(self.http_port),
            self.listen_string(self.https_port),
        )

    def _refresh_status(self) -> None:
        table = self.routes.table
        parts = [
            f"http {self.listen_string(self.http_port) or 'unbound'}",
            f"https {self.listen_string(self.https_port) or 'unbound'}",
            f"{len(table.l7)} http routes",
            f"{len(table.l4)} stream routes",
        ]
        self.detail = ", ".join(parts)
        if self.bind_errors:
            self.state = "degraded"
            self.detail += "; " + "; ".join(self.bind_errors.values())
        elif self.state == "degraded":
            self.state = "running"

    async def _sweep(self) -> None:
        assert self.core is not None
        idle = self.settings.idle_timeout
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.core.pool.sweep(idle)
            for listener in (self.plain, self.secure):
                if listener is not None:
                    listener.sweep(idle)
            for endpoints in self.udp.values():
                for udp in endpoints:
                    udp.sweep()

    # ------------------------------------------------------------ pushes

    async def sync_traffic(self, text: str) -> SyncResult:
        """schedd's complete view: apply every deployment, remove the ones it no longer names."""
        try:
            views = TrafficViews.model_validate_json(text)
        except ValidationError as exc:
            raise InvalidArgumentError(f"the traffic views are not a TrafficViews: {exc}") from None
        async with self._sync_lock:
            if not self.held.accepts(views.generation):
                self.log.info(
                    "ignored traffic views of generation %d: generation %d is newer",
                    views.generation,
                    self.held.value,
                )
                return refused(self.held)

            async def apply_one(deployment: str, view: DeploymentTraffic) -> None:
                await self.set_traffic(deployment, view.model_dump_json())

            result = await apply_views(views, list(self.routes.deployments), apply_one)
            await asyncio.to_thread(self.held.hold, views.generation)
        for deployment, sentence in result.refusals.items():
            self.log.warning("routes of %s refused: %s", deployment, sentence)
        for _deployment, sentence in result.removed:
            self.log.info("%s", sentence)
        return result

    async def set_traffic(self, deployment: str, traffic_json: str) -> None:
        try:
            traffic = Routes.parse(deployment, traffic_json)
        except RouteError as exc:
            raise InvalidArgumentError(str(exc)) from None
        async with self._lock:
            try:
                self.routes.apply(traffic)
            except RouteError as exc:
                raise (ConflictError if exc.conflict else InvalidArgumentError)(str(exc)) from None
            try:
                await self._sync_streams()
            except OSError as exc:
                self.routes.undo()
                await self._sync_streams()
                raise UnavailableError(str(exc)) from None
            try:
                await asyncio.to_thread(self.routes.save, traffic)
            except OSError as exc:
                self.log.warning(
                    "could not save the routes of %s (%s); a restart will wait for the next push",
                    deployment,
                    exc.strerror,
                )
            self._restart_health_checks()
            assert self.core is not None
            self.core.pool.close_backends(self.routes.forget_unused())
            self._refresh_status()
        routes = [r for r in (*self.routes.table.l7, *self.routes.table.l4.values())]
        mine = [r for r in routes if r.deployment == deployment]
        self.log.info(
            "%s: %d routes, %d backends",
            deployment,
            len(mine),
            len({b.key for r in mine for b in r.backends}),
        )

    async def _sync_streams(self) -> None:
        """Open listeners for new L4 routes, close the ones no route has; OSError names the port."""
        loop = asyncio.get_running_loop()
        wanted = self.routes.table.l4
        assert self.core is not None
        # tcp
        for port in [
            p
            for p in self.tcp
            if ("tcp", p) not in wanted or wanted[("tcp", p)].tls != self.tcp[p].tls_on
        ]:
            self.tcp.pop(port).close()
        opened: list[TcpEndpoint] = []
        for (protocol, port), route in wanted.items():
            if protocol != "tcp":
                continue
            endpoint = self.tcp.get(port)
            if endpoint is not None:
                endpoint.route = route
                continue
            endpoint = TcpEndpoint(route, self.settings.connect_timeout)
            try:
                await endpoint.listen(
                    self.settings.listen_addresses, self.l4_tls.context if self.l4_tls else None
                )
            except OSError as exc:
                endpoint.close()
                for other in opened:
                    other.close()
                    self.tcp.pop(other.route.port, None)
                raise OSError(
                    exc.errno,
                    f"cannot listen on tcp port {port} for {route.deployment}/{route.service} "
                    f"endpoint {route.endpoint} ({exc.strerror}); choose another port",
                ) from None
            opened.append(endpoint)
            self.tcp[port] = endpoint
        # udp
        for port in [p for p in self.udp if ("udp", p) not in wanted]:
            for udp in self.udp.pop(port):
                udp.close()
        for (protocol, port), route in wanted.items():
            if protocol != "udp":
                continue
            if port in self.udp:
                for udp in self.udp[port]:
                    udp.route = route
                continue
            endpoints: list[UdpEndpoint] = []
            try:
                for address in self.settings.listen_addresses:
                    _, udp = await loop.create_datagram_endpoint(
                        lambda route=route: UdpEndpoint(route),  # type: ignore[misc]
                        local_addr=(address, port),
                        reuse_port=False,
                    )
                    endpoints.append(udp)
            except OSError as exc:
                for udp in endpoints:
                    udp.close()
                raise OSError(
                    exc.errno,
                    f"cannot listen on udp port {port} for {route.deployment}/{route.service} "
                    f"endpoint {route.endpoint} ({exc.strerror}); choose another port",
                ) from None
            self.udp[port] = endpoints

    def _restart_health_checks(self) -> None:
        for task in self.health.values():
            task.cancel()
        self.health = {}
        for route in self.routes.table.l4.values():
            if not route.health_check:
                for backend in route.backends:
                    backend.healthy = True  # no check of proxyd's own: schedd's view holds
        checked: list[Route] = [r for r in self.routes.table.l4.values() if r.health_check]
        for route in checked:
            self.health[route.key] = asyncio.create_task(
                health_loop(route, self.settings.connect_timeout), name=f"health {route.key}"
            )


def main() -> None:
    main_for(ProxyDaemon)
