"""Entry point and bus object of zlayer-proxyd.

The daemon serves the routes it persisted at once on start, applies
schedd's pushes (``SetTraffic``), opens and closes the listeners those
name, runs the L4 health checks, and sweeps idle connections once a second.

An http/https/websocket endpoint is served on its own ``port``: one
listener per (address, port), shared by every route on that port and
routed by host and path. Public routes listen on every listen address,
internal ones on the node network's address, which overlayd says
(``GetNetwork``). A port that cannot be bound refuses the push that asked
for it; one that was served before and cannot be bound again after a
restart leaves the daemon ``degraded`` with the reason, retrying every few
seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from sdbus import dbus_method_async_override

from daemons.proxyd import sockets
from daemons.proxyd.exchange import ProxyCore
from daemons.proxyd.http1 import ClientConnection, Listener
from daemons.proxyd.limits import FD_RESERVE, connections_that_fit
from daemons.proxyd.metrics import ACCESS_LOG_DROPPED
from daemons.proxyd.routes import Route, RouteError, Routes
from daemons.proxyd.settings import ProxySettings
from daemons.proxyd.stream import TcpEndpoint, UdpEndpoint, UdpSessions, health_loop
from daemons.proxyd.tls import L7_ALPN, CertificateStore, ServerTls, TlsConfigError
from shared.bus import (
    DAEMONS_BY_NAME,
    ConflictError,
    InvalidArgumentError,
    Proxy1,
    UnavailableError,
)
from shared.clients import OverlayClient
from shared.daemon import EX_CONFIG, Daemon, daemon_members, main_for
from shared.logs import logged_off_the_loop
from shared.paths import Paths
from shared.views import TrafficHolder
from shared.wire import encode
from shared.wire.agent import SyncResult
from shared.wire.traffic import DeploymentTraffic

REBIND_INTERVAL = 5.0
SWEEP_INTERVAL = 1.0
NETWORK_TIMEOUT = 5.0
DRAIN_TIMEOUT = 20.0  # within the unit's TimeoutStopSec
DRAIN_POLL = 0.05
FIRST_REQUEST_WAIT = 2.0  # an accepted connection's first request, when stopping

ListenKey = tuple[str, int]  # (address, port)


@dataclass
class Bound:
    """One L7 listener: its server and what its connections share."""

    server: asyncio.Server
    listener: Listener
    sock: socket.socket  # what the server listens on (the store keeps its twin)


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
        return encode(await self.daemon.sync_traffic(views))

    @dbus_method_async_override()
    async def list_routes(self) -> str:
        daemon = self.daemon
        infos = daemon.routes.route_infos(daemon.settings.listen_addresses, daemon.node_address)
        return encode(infos)

    @dbus_method_async_override()
    async def service_stats(self) -> str:
        return encode(self.daemon.routes.stats())


class ProxyDaemon(Daemon):
    info = DAEMONS_BY_NAME["proxyd"]
    holds_view = True
    settings_class = ProxySettings
    settings: ProxySettings

    def __init__(self, settings: ProxySettings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.routes = Routes(paths.daemon_state(self.info.name))
        self.views = TrafficHolder(paths.daemon_state(self.info.name), self.log)
        self.l7: dict[ListenKey, Bound] = {}
        self.retired: list[Listener] = []  # closed listeners whose connections finish their work
        self.bind_errors: dict[ListenKey, str] = {}
        self.node_address = ""
        self.node_error = ""
        self.tcp: dict[int, TcpEndpoint] = {}
        self.udp: dict[int, list[UdpEndpoint]] = {}
        self.health: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self.core: ProxyCore | None = None
        self._stop_access_writer: Callable[[], None] | None = None  # the access log's thread
        self.l7_tls: ServerTls | None = None
        self.l4_tls: ServerTls | None = None
        self._tls_lock = asyncio.Lock()

    def make_service(self) -> ProxyService:
        return ProxyService(self)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        settings = self.settings
        if settings.tls_cert_dir is not None or settings.tls_certificates:
            # configured certificates are checked at start: a bad one is a config error
            try:
                await self._load_tls()
            except TlsConfigError as exc:
                self.log.error("%s", exc)
                raise SystemExit(EX_CONFIG) from None
        for warning in await asyncio.to_thread(self.routes.load):
            self.log.warning("%s", warning)
        if not settings.access_log:
            logging.getLogger("zlayer.proxyd.access").disabled = True
        elif self._stop_access_writer is None:
            self._stop_access_writer = logged_off_the_loop(
                "zlayer.proxyd.access", ACCESS_LOG_DROPPED.inc
            )
        for key in ("http_port", "https_port"):
            if key in settings.model_fields_set:
                self.log.warning(
                    "%s in %s has no effect any more: each endpoint is served on its own port; "
                    "remove it",
                    key,
                    self.paths.daemon_config(self.info.name),
                )
        self._raise_fd_limit()
        self.core = ProxyCore(settings, self.routes)
        if self._has_internal():
            await self._learn_node_address()
        await self._sync_l7(strict=set())
        try:
            await self._sync_streams()
        except OSError as exc:
            self.log.error("%s", exc)
        self._release_leftovers()
        self._restart_health_checks()
        self.tasks.append(asyncio.create_task(self._sweep(), name="sweep"))
        self.tasks.append(asyncio.create_task(self._rebind(), name="rebind"))
        asyncio.get_running_loop().call_soon(self._refresh_status)
        self.log.info(
            "listening on %s; %d routes from %d saved deployments",
            self._listening() or "no port yet",
            len(self.routes.table.l7) + len(self.routes.table.l4),
            len(self.routes.deployments),
        )

    async def stop(self) -> None:
        for task in [*self.tasks, *self.health.values()]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Stop accepting; the supervisor keeps the sockets, so new connections
        # wait in the kernel for the next process. Requests in flight finish.
        for bound in self.l7.values():
            bound.server.close()
        await self._drain(DRAIN_TIMEOUT)
        for listener in self._listeners():
            for connection in list(listener.connections):
                connection.close()
        for endpoint in self.tcp.values():
            endpoint.close(for_good=False)  # the supervisor keeps the sockets
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
        if self._stop_access_writer is not None:  # what is queued is written, then it ends
            await asyncio.to_thread(self._stop_access_writer)
            self._stop_access_writer = None

    def _raise_fd_limit(self) -> None:
        """Take the hard limit of open files as the soft one, and say if it is still low.

        The soft limit is 1024 by default (for select()); proxyd uses epoll.
        Each client connection may hold a backend connection too: two each.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        if soft == resource.RLIM_INFINITY:
            return
        configured = self.settings.max_connections
        explicit = "max_connections" in self.settings.model_fields_set
        applied, too_low = connections_that_fit(soft, configured, explicit)
        if too_low:
            self.log.warning(
                "the open file limit (%d) is below what one listener at max_connections (%d) "
                "may need (%d); raise LimitNOFILE in zlayer-proxyd.service or lower "
                "max_connections in %s",
                soft,
                configured,
                2 * configured + FD_RESERVE,
                self.paths.daemon_config(self.info.name),
            )
        elif applied != configured:
            self.log.info(
                "max_connections is %d per listener, what the open file limit (%d) fits; "
                "raise LimitNOFILE in zlayer-proxyd.service for up to %d",
                applied,
                soft,
                configured,
            )
            self.settings.max_connections = applied

    # ------------------------------------------------------------ listeners

    async def _load_tls(self) -> None:
        """Read the certificates (making the self-signed one if none is configured)."""
        state_dir = self.paths.daemon_state(self.info.name)
        certificates = await asyncio.to_thread(CertificateStore.load, self.settings, state_dir)
        if certificates.self_signed:
            self.log.info(
                "no TLS certificate configured; serving a self-signed one for development "
                "(set tls_cert_dir or tls_certificates in %s)",
                self.paths.daemon_config(self.info.name),
            )
        self.l7_tls = certificates.server_context(L7_ALPN)
        self.l4_tls = certificates.server_context(None)

    async def _ensure_tls(self) -> None:
        """The certificates, read with the first TLS listener (cryptography comes with them)."""
        async with self._tls_lock:
            if self.l7_tls is not None:
                return
            try:
                await self._load_tls()
            except TlsConfigError as exc:
                raise OSError(str(exc)) from None

    async def reload(self) -> None:
        """SIGHUP (``systemctl reload zlayer-proxyd``): read the certificates again.

        New handshakes get the new ones; established connections keep theirs.
        Files that cannot be used leave the old certificates serving.
        """
        if self.l7_tls is None:
            # Nothing serves them yet: the first TLS listener reads them as they are then.
            self.log.info("no TLS listener yet; certificates are read when the first one opens")
            return
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

    async def _drain(self, timeout: float) -> None:
        """Close client connections as they become idle, until none is left or ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.core is not None:
            self.core.draining = True
        while True:
            busy = 0
            for listener in self._listeners():
                for connection in list(listener.connections):
                    if connection.drainable(FIRST_REQUEST_WAIT):
                        connection.close()
                    else:
                        busy += 1
            if not busy or loop.time() >= deadline:
                if busy:
                    self.log.warning("stopping with %d requests still in flight", busy)
                return
            await asyncio.sleep(DRAIN_POLL)

    def _listeners(self) -> list[Listener]:
        return [bound.listener for bound in self.l7.values()] + self.retired

    def _listening(self) -> str:
        """``http 0.0.0.0:80, https 0.0.0.0:443`` for the status line and the log."""
        return ", ".join(
            f"{b.listener.name} {a}:{p}"
            for (a, p), b in sorted(self.l7.items(), key=lambda i: i[0][1])
        )

    def _has_internal(self) -> bool:
        return any(ports.has_internal for ports in self.routes.table.ports.values())

    async def _learn_node_address(self) -> None:
        """Ask overlayd for the node network's address (internal endpoints listen there)."""
        if self.node_address or self.bus is None:
            return
        overlay = OverlayClient(self.bus)
        try:
            network = await asyncio.wait_for(overlay.get_network(), NETWORK_TIMEOUT)
            self.node_address = network.gateway
        except Exception as exc:  # not running yet, or restarting: the rebind loop asks again
            message = (
                "internal endpoints wait for the node network's address: "
                f"zlayer-overlayd did not give it ({exc})"
            )
            if message != self.node_error:
                self.log.warning("%s", message)
            self.node_error = message
            return
        self.node_error = ""
        assert self.core is not None
        self.core.node_address = self.node_address
        self.log.info(
            "internal endpoints listen on the node network's address %s", self.node_address
        )

    def _wanted_l7(self) -> dict[ListenKey, bool]:
        """Every (address, port) the L7 routes need, and whether it is TLS."""
        wanted: dict[ListenKey, bool] = {}
        public = self.settings.listen_addresses
        node = self.node_address
        for port, ports in self.routes.table.ports.items():
            addresses = list(public) if ports.has_public else []
            covered = node in addresses or (ports.has_public and "0.0.0.0" in public)
            if ports.has_internal and node and not covered:
                addresses.append(node)
            for address in addresses:
                wanted[(address, port)] = ports.secure
        return wanted

    async def _open_l7(self, key: ListenKey, secure: bool) -> Bound:
        """A listener on (address, port); OSError when the port cannot be had."""
        assert self.core is not None  # start() made it
        if secure:
            await self._ensure_tls()
            assert self.l7_tls is not None
        address, port = key
        sock = sockets.take(address, port)
        listener = Listener(self.core, secure, port)
        try:
            server = await asyncio.get_running_loop().create_server(
                lambda: ClientConnection(listener),
                sock=sock,
                ssl=self.l7_tls.context if secure and self.l7_tls else None,
                # a handshake is part of the first request's head
                ssl_handshake_timeout=self.settings.request_head_timeout if secure else None,
            )
        except BaseException:
            sock.close()
            raise
        return Bound(server, listener, sock)

    def _close_l7(self, key: ListenKey, for_good: bool = True) -> None:
        """Stop listening on (address, port); its connections finish their work.

        Not ``for_good``: a listener of the other scheme takes the same socket.
        """
        bound = self.l7.pop(key)
        if for_good:
            sockets.release(*key)
        else:
            sockets.park(*key, bound.sock)
        bound.server.close()
        if bound.listener.connections:
            self.retired.append(bound.listener)

    def _bind_sentence(self, key: ListenKey, exc: OSError) -> str:
        """Why (address, port) cannot be listened on and what to do, in one sentence."""
        address, port = key
        ports = self.routes.table.ports.get(port)
        routes = list(ports.owners.values()) if ports else []
        public = [r for r in routes if not r.internal]
        route = (public or routes)[0] if routes else None
        what = f" for {route.where}" if route else ""
        if exc.errno == errno.EADDRINUSE:
            fix = "another program is listening there; stop it or give the endpoint another port"
        elif exc.errno == errno.EACCES:
            fix = (
                "ports below 1024 need the CAP_NET_BIND_SERVICE capability, which zlayer-proxyd "
                "does not have; grant it or give the endpoint a port from 1024 up"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = f"{address} is not an address of this host; check listen_addresses in " + str(
                self.paths.daemon_config(self.info.name)
            )
        else:
            fix = f"{exc.strerror or exc}; give the endpoint another port"
        return f"cannot listen on {address}:{port}{what}: {fix}"

    async def _sync_l7(self, strict: set[ListenKey]) -> None:
        """Open the listeners the routes need and close the others.

        A listener in ``strict`` that cannot be opened raises OSError (with
        the sentence) after closing the ones this call opened; any other is
        kept in ``bind_errors`` for the rebind loop.
        """
        wanted = self._wanted_l7()
        for key, bound in list(self.l7.items()):
            if wanted.get(key) != bound.listener.secure:
                self._close_l7(key, for_good=key not in wanted)
        opened: list[ListenKey] = []
        for key, secure in sorted(wanted.items()):
            if key in self.l7:
                continue
            try:
                self.l7[key] = await self._open_l7(key, secure)
            except OSError as exc:
                sentence = self._bind_sentence(key, exc)
                if key in strict:
                    for done in opened:
                        self._close_l7(done)
                    raise OSError(exc.errno, sentence) from None
                if self.bind_errors.get(key) != sentence:
                    self.log.error("%s", sentence)
                self.bind_errors[key] = sentence
                continue
            opened.append(key)
            if self.bind_errors.pop(key, None):
                self.log.info("listening on %s:%d again", *key)
        for key in [k for k in self.bind_errors if k not in wanted]:
            del self.bind_errors[key]

    def _release_leftovers(self) -> None:
        """Close kept sockets no route took (their routes went while proxyd was down).

        Not while internal routes wait for the node address: theirs are among them.
        """
        if self.node_address or not self._has_internal():
            for name in sockets.release_leftovers():
                self.log.info("closed the kept socket %s: no route uses its port", name)

    async def _rebind(self) -> None:
        """Retry what start-up could not do: ports still held, overlayd not there yet."""
        while True:
            await asyncio.sleep(REBIND_INTERVAL)
            if not self.bind_errors and (self.node_address or not self._has_internal()):
                continue
            async with self._lock:
                if self._has_internal():
                    await self._learn_node_address()
                await self._sync_l7(strict=set())
                self._release_leftovers()
                self._refresh_status()

    def _refresh_status(self) -> None:
        table = self.routes.table
        parts = [
            self._listening() or "no listeners",
            f"{len(table.l7)} http routes",
            f"{len(table.l4)} stream routes",
        ]
        self.detail = "; ".join(parts)
        problems = list(self.bind_errors.values())
        if self.node_error and self._has_internal():
            problems.append(self.node_error)
        if problems:
            self.state = "degraded"
            self.detail += "; " + "; ".join(problems)
        elif self.state == "degraded":
            self.state = "running"

    async def _sweep(self) -> None:
        assert self.core is not None
        idle = self.settings.idle_timeout
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.core.pool.sweep(idle)
            for listener in self._listeners():
                listener.sweep(idle)
            self.retired = [r for r in self.retired if r.connections]
            for endpoints in self.udp.values():
                for udp in endpoints:
                    udp.sweep()

    # ------------------------------------------------------------ pushes

    async def sync_traffic(self, text: str) -> SyncResult:
        """schedd's complete view: apply every deployment, remove the ones it no longer names."""

        async def apply_one(deployment: str, view: DeploymentTraffic) -> None:
            await self.set_traffic(deployment, encode(view))

        return await self.views.sync(text, lambda: self.routes.deployments, apply_one)

    async def set_traffic(self, deployment: str, traffic_json: str) -> None:
        try:
            traffic = Routes.parse(deployment, traffic_json)
        except RouteError as exc:
            raise InvalidArgumentError(str(exc)) from None
        async with self._lock:
            await self.apply_traffic(traffic)

    async def apply_traffic(self, traffic: DeploymentTraffic) -> None:
        """Replace one deployment's routes (none: remove it), open and close listeners, save.

        Call with ``_lock`` held. Raises the bus error a refusal is, leaving
        the routes and listeners as they were.
        """
        deployment = traffic.deployment
        before = set(self._wanted_l7())
        try:
            self.routes.apply(traffic)
        except RouteError as exc:
            raise (ConflictError if exc.conflict else InvalidArgumentError)(str(exc)) from None
        if self._has_internal():
            await self._learn_node_address()
        try:
            await self._sync_l7(strict=set(self._wanted_l7()) - before)
            await self._sync_streams()
        except OSError as exc:
            self.routes.undo()
            await self._sync_l7(strict=set())
            await self._sync_streams()
            self._refresh_status()
            error = ConflictError if exc.errno == errno.EADDRINUSE else UnavailableError
            raise error(str(exc.strerror or exc)) from None
        try:
            await asyncio.to_thread(self.routes.save, traffic)
        except OSError as exc:
            self.log.warning(
                "could not save the routes of %s (%s); a restart will wait for the next push",
                deployment,
                exc.strerror,
            )
        self._release_leftovers()
        self._restart_health_checks()
        assert self.core is not None
        self.core.pool.close_backends(self.routes.forget_unused())
        self._refresh_status()
        for route, why in self.routes.table.shadowed:
            if route.deployment == deployment:
                self.log.warning("not served on the node address: %s", why)
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
            going = self.tcp.pop(port)
            if ("tcp", port) in wanted:  # tls turned on or off: the same sockets serve on
                going.park()
            going.close(for_good=("tcp", port) not in wanted)
        opened: list[TcpEndpoint] = []
        for (protocol, port), route in wanted.items():
            if protocol != "tcp":
                continue
            endpoint = self.tcp.get(port)
            if endpoint is not None:
                endpoint.route = route
                continue
            endpoint = TcpEndpoint(
                route, self.settings.connect_timeout, self.settings.max_connections
            )
            try:
                if route.tls:
                    await self._ensure_tls()
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
            for address in self.settings.listen_addresses:
                sockets.release(address, port, udp=True)
        for (protocol, port), route in wanted.items():
            if protocol != "udp":
                continue
            if port in self.udp:
                for udp in self.udp[port]:
                    udp.route = route
                continue
            endpoints: list[UdpEndpoint] = []
            table = UdpSessions(self.settings.udp_max_sessions)  # the route's, on every address
            try:
                for address in self.settings.listen_addresses:
                    sock = sockets.take(address, port, udp=True)  # the kept one after a restart
                    try:
                        _, udp = await loop.create_datagram_endpoint(
                            lambda route=route, table=table: UdpEndpoint(route, table),  # type: ignore[misc]
                            sock=sock,
                        )
                    except BaseException:
                        sock.close()
                        raise
                    endpoints.append(udp)
            except OSError as exc:
                for udp in endpoints:
                    udp.close()
                for address in self.settings.listen_addresses:
                    sockets.release(address, port, udp=True)
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
