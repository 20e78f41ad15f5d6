"""L4 in userspace: tcp and udp public endpoints with ``stream.tls`` or ``stream.proxy_protocol``.

Each such endpoint listens on its ``port`` on every listen address:

- tcp: a client connection is spliced to a backend (round-robin over
  backends in rotation, one retry on another when connecting fails). With
  ``stream.tls`` proxyd terminates TLS (the HTTPS certificates, by SNI) and
  forwards plain bytes; with ``stream.proxy_protocol`` a PROXY protocol
  **version 2** header (binary) goes to the backend before the client's bytes.
- udp: a session per client address, to one backend, forgotten after
  ``stream.session_timeout`` (60 s) without traffic, at most
  ``udp_max_sessions`` per route (a new client past it ends the session
  idle longest, counted in ``zlayer_proxy_udp_sessions_evicted_total``); with
  ``stream.proxy_protocol`` each datagram carries a v2 header. (There is no
  DTLS: ``stream.tls`` on udp is refused at the push.)

``stream.health_check`` (tcp_connect, or udp_probe with request/expect) is
run by proxyd itself every ``health_interval`` (5 s when schedd sent none);
a failing backend leaves rotation until it passes again.

A tcp endpoint holds at most ``max_connections`` clients; past it a new one
is closed at once (``zlayer_proxy_connections_refused_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections import OrderedDict
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import cast

from daemons.proxyd import sockets
from daemons.proxyd.balancer import pick
from daemons.proxyd.limits import ConnectionLimit
from daemons.proxyd.metrics import UDP_SESSIONS_EVICTED
from daemons.proxyd.routes import BackendState, Route

log = logging.getLogger("zlayer.proxyd")

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
DEFAULT_HEALTH_INTERVAL = 5.0
BUFFER_HIGH = 256 * 1024


def proxy_v2_header(
    source: tuple[str, int], destination: tuple[str, int], *, datagram: bool = False
) -> bytes:
    """The binary PROXY protocol v2 header for one connection (or datagram)."""
    src = ip_address(source[0])
    dst = ip_address(destination[0])
    transport = 0x2 if datagram else 0x1
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        family = 0x10
        addresses = src.packed + dst.packed
    else:
        family = 0x20
        src6 = src if isinstance(src, IPv6Address) else IPv6Address(f"::ffff:{src}")
        dst6 = dst if isinstance(dst, IPv6Address) else IPv6Address(f"::ffff:{dst}")
        addresses = src6.packed + dst6.packed
    body = addresses + struct.pack("!HH", source[1], destination[1])
    return (
        PROXY_V2_SIGNATURE + bytes([0x21, family | transport]) + struct.pack("!H", len(body)) + body
    )


# ---------------------------------------------------------------- tcp


class StreamClient(asyncio.Protocol):
    """A client of a tcp stream endpoint, spliced to one backend."""

    def __init__(self, endpoint: TcpEndpoint) -> None:
        self.endpoint = endpoint
        self.route = endpoint.route
        self.transport: asyncio.Transport | None = None
        self.upstream: StreamUpstream | None = None
        self.backend: BackendState | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.closed = False
        self.client_eof = False
        self.peer: tuple[str, int] = ("0.0.0.0", 0)
        self.local: tuple[str, int] = ("0.0.0.0", 0)
        self.started = time.monotonic()
        self.received = 0
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self.transport = cast(asyncio.Transport, transport)
        if self.endpoint.limit.full(len(self.endpoint.clients)):
            self.closed = True  # nothing was counted for it
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if peer:
            self.peer = (str(peer[0]), int(peer[1]))
        if local:
            self.local = (str(local[0]), int(local[1]))
        self.endpoint.clients.add(self)
        route = self.route
        route.counters.requests_total += 1
        route.counters.active += 1
        route.metrics.active.inc()
        backend = pick(route, "round_robin")
        if backend is None:
            log.warning(
                "%s/%s %s: no backend in rotation; closed a connection from %s",
                route.deployment,
                route.service,
                route.endpoint,
                self.peer[0],
            )
            transport.close()
            return
        self._connect(backend, retry=True)

    def _connect(self, backend: BackendState, *, retry: bool) -> None:
        if self.backend is not None:
            self.backend.active -= 1
        self.backend = backend
        backend.active += 1
        self.endpoint.spawn(self._open(backend, retry))

    async def _open(self, backend: BackendState, retry: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.endpoint.connect_timeout):
                _, upstream = await loop.create_connection(
                    lambda: StreamUpstream(self), backend.address, backend.port
                )
        except (OSError, TimeoutError) as exc:
            self.route.metrics.backend_failure("connect")
            other = pick(self.route, "round_robin", exclude=backend) if retry else None
            if other is not None and not self.closed:
                self._connect(other, retry=False)
                return
            log.warning(
                "%s/%s %s: cannot reach backend %s (%s)",
                self.route.deployment,
                self.route.service,
                self.route.endpoint,
                backend.key,
                exc or "timed out",
            )
            if self.transport is not None:
                self.transport.close()
            return
        if self.closed:
            upstream.close()
            return
        self.upstream = upstream
        if self.route.proxy_protocol:
            upstream.write(proxy_v2_header(self.peer, self.local))
        for data in self.pending:
            upstream.write(data)
        self.pending = []
        if self.pending_bytes > BUFFER_HIGH and self.transport is not None:
            self.transport.resume_reading()
        self.pending_bytes = 0
        if self.client_eof:
            upstream.write_eof()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > BUFFER_HIGH and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream is not None:
            self.upstream.write_eof()
        return True  # keep the other direction open

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.endpoint.clients.discard(self)
        route = self.route
        route.counters.active -= 1
        route.metrics.active.dec()
        if self.backend is not None:
            self.backend.active -= 1
        route.metrics.request_done(200, time.monotonic() - self.started, self.received, self.sent)
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause(True)

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause(False)

    # from the upstream side

    def write(self, data: bytes) -> None:
        self.sent += len(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def pause(self, paused: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class StreamUpstream(asyncio.Protocol):
    """The backend side of a tcp stream connection."""

    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def eof_received(self) -> bool:
        self.client.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()

    def pause_writing(self) -> None:
        self.client.pause(True)

    def resume_writing(self) -> None:
        self.client.pause(False)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause(self, paused: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TcpEndpoint:
    """The listeners of one tcp stream endpoint; ``route`` is swapped on each push."""

    def __init__(self, route: Route, connect_timeout: float, max_connections: int) -> None:
        self.route = route
        self.connect_timeout = connect_timeout
        self.limit = ConnectionLimit("tcp", route.port, max_connections)
        self.servers: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self.socks: list[socket.socket] = []
        self.clients: set[StreamClient] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.tls_on = route.tls

    def spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def listen(self, addresses: list[str], tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        for address in addresses:
            sock = sockets.take(address, self.route.port)  # the kept one after a restart
            try:
                server = await loop.create_server(
                    lambda: StreamClient(self), sock=sock, ssl=tls if self.route.tls else None
                )
            except BaseException:
                sock.close()
                raise
            self.servers.append(server)
            self.addresses.append(address)
            self.socks.append(sock)

    def park(self) -> None:
        """Keep the sockets for the next :meth:`listen` on this port (``close(for_good=False)``)."""
        for address, sock in zip(self.addresses, self.socks, strict=True):
            sockets.park(address, self.route.port, sock)

    def close(self, for_good: bool = True) -> None:
        """Stop listening; connections in flight finish on their own.

        ``for_good``: no route needs the port any more, so the supervisor
        need not keep its sockets (not when proxyd only stops).
        """
        for server in self.servers:
            server.close()
        if for_good:
            for address in self.addresses:
                sockets.release(address, self.route.port)
        self.servers = []
        self.addresses = []
        self.socks = []

    def abort_all(self) -> None:
        for client in list(self.clients):
            client.close()
        for task in self.tasks:
            task.cancel()


# ---------------------------------------------------------------- udp


class UdpSession(asyncio.DatagramProtocol):
    """One client address's flow to one backend."""

    def __init__(
        self, endpoint: UdpEndpoint, client: tuple[str, int], backend: BackendState
    ) -> None:
        self.endpoint = endpoint
        self.client = client
        self.backend = backend
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] = []
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        for data in self.pending:
            self.transport.sendto(data)
        self.pending = []

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self._active()
        self.endpoint.reply(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from the backend: the client will retry or give up

    def send(self, data: bytes) -> None:
        self._active()
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.sendto(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _active(self) -> None:
        """Traffic either way: the idle sweep and the eviction order both follow it."""
        self.last_active = time.monotonic()
        self.endpoint.table.touch(self)


class UdpSessions:
    """The sessions of one udp route on all its addresses, least recently active first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_activity: OrderedDict[UdpSession, None] = OrderedDict()

    def add(self, session: UdpSession) -> None:
        self.by_activity[session] = None

    def touch(self, session: UdpSession) -> None:
        if session in self.by_activity:  # a backend's late reply may follow its end
            self.by_activity.move_to_end(session)

    def discard(self, session: UdpSession) -> None:
        self.by_activity.pop(session, None)

    def make_room(self, route: Route) -> None:
        """At the limit: end the session idle longest (a new client is about to start one)."""
        while len(self.by_activity) >= self.limit:
            oldest = next(iter(self.by_activity))
            oldest.endpoint.end(oldest)
            UDP_SESSIONS_EVICTED.labels(route.deployment, route.service, route.endpoint).inc()


class UdpEndpoint(asyncio.DatagramProtocol):
    """One udp stream endpoint on one address: sessions by client address."""

    def __init__(self, route: Route, table: UdpSessions) -> None:
        self.route = route
        self.table = table
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[tuple[str, int], UdpSession] = {}
        self.local: tuple[str, int] = ("0.0.0.0", route.port)
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        local = transport.get_extra_info("sockname")
        if local:
            self.local = (str(local[0]), int(local[1]))

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        client = (str(addr[0]), int(addr[1]))
        route = self.route
        session = self.sessions.get(client)
        if session is None:
            backend = pick(route, "round_robin")
            if backend is None:
                return
            self.table.make_room(route)
            session = UdpSession(self, client, backend)
            self.sessions[client] = session
            self.table.add(session)
            backend.active += 1
            route.counters.active += 1
            route.metrics.active.inc()
            task = asyncio.get_running_loop().create_task(self._open(session))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        route.counters.requests_total += 1
        route.metrics.bytes_in.inc(len(data))
        if route.proxy_protocol:
            data = proxy_v2_header(client, self.local, datagram=True) + data
        session.send(data)

    async def _open(self, session: UdpSession) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(
                lambda: session, remote_addr=(session.backend.address, session.backend.port)
            )
        except OSError:
            self.end(session)

    def reply(self, data: bytes, client: tuple[str, int]) -> None:
        if self.transport is not None:
            self.route.metrics.bytes_out.inc(len(data))
            self.transport.sendto(data, client)

    def sweep(self) -> None:
        deadline = time.monotonic() - self.route.session_timeout
        for session in [s for s in self.sessions.values() if s.last_active < deadline]:
            self.end(session)

    def end(self, session: UdpSession) -> None:
        if self.sessions.pop(session.client, None) is None:
            return
        self.table.discard(session)
        session.close()
        session.backend.active -= 1
        self.route.counters.active -= 1
        self.route.metrics.active.dec()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort_all(self) -> None:
        for session in list(self.sessions.values()):
            self.end(session)
        for task in self.tasks:
            task.cancel()


# ---------------------------------------------------------------- health checks


async def check_backend(route: Route, backend: BackendState, timeout: float) -> bool:
    """One ``stream.health_check`` of one backend."""
    check = route.health_check or {}
    if check.get("type") == "udp_probe":
        return await _udp_probe(
            backend, str(check.get("request", "")), check.get("expect"), timeout
        )
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(backend.address, backend.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _Probe(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _udp_probe(backend: BackendState, request: str, expect: object, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    transport, probe = await loop.create_datagram_endpoint(
        _Probe, remote_addr=(backend.address, backend.port), family=socket.AF_INET
    )
    try:
        transport.sendto(request.encode())
        async with asyncio.timeout(timeout):
            answer = await probe.answer
    except (OSError, TimeoutError):
        return False
    finally:
        transport.close()
    return expect is None or str(expect).encode() in answer


async def health_loop(route: Route, timeout: float) -> None:
    """Check every backend of ``route`` forever, moving them in and out of rotation."""
    interval = route.health_interval or DEFAULT_HEALTH_INTERVAL
    while True:
        backends = list(route.backends)
        results = await asyncio.gather(*(check_backend(route, b, timeout) for b in backends))
        for backend, healthy in zip(backends, results, strict=True):
            if healthy != backend.healthy:
                log.warning(
                    "%s/%s %s: backend %s %s its health check",
                    route.deployment,
                    route.service,
                    route.endpoint,
                    backend.key,
                    "passes" if healthy else "fails",
                )
                backend.healthy = healthy
        await asyncio.sleep(interval)
