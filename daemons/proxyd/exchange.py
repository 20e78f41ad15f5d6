"""One request's way through the proxy, whichever protocol the client speaks.

A client connection (HTTP/1.1 in :mod:`http1`, an HTTP/2 stream in
:mod:`http2`) parses a request, finds its route and makes an
:class:`Exchange`; the exchange picks a backend, takes a pooled connection
(or opens one), sends the request as HTTP/1.1 and hands the response back
to its :class:`Downstream` as events. It owns the failure rules:

- connecting fails or a fresh connection dies before answering: one retry
  on another backend, when nothing was sent yet or the method is idempotent
  (the body sent so far is kept for that, up to :data:`REPLAY_LIMIT`);
- a reused keep-alive connection dies before answering (the backend closed
  it as we sent): the same request again on a fresh connection;
- no backend in rotation: 503; the backend failed: 502; it did not
  connect or start its response in time: 504.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from daemons.proxyd.balancer import pick
from daemons.proxyd.pool import UpstreamConnection, UpstreamPool
from daemons.proxyd.routes import BackendState, Route, Routes
from daemons.proxyd.settings import ProxySettings

REPLAY_LIMIT = 64 * 1024
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# Headers that describe one hop, never forwarded as they are.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})

access_log = logging.getLogger("zlayer.proxyd.access")


class ProxyCore:
    """What every connection of the proxy shares."""

    def __init__(self, settings: ProxySettings, routes: Routes) -> None:
        self.settings = settings
        self.routes = routes
        self.pool = UpstreamPool(settings.connect_timeout, settings.upstream_keepalive)
        self.balancing = settings.balancing
        self.access_log = settings.access_log
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self.node_address = ""  # the node network's address, once overlayd has said it
        self.draining = False  # stopping: every answer closes its connection

    def spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self.loop.create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class Downstream(Protocol):
    """The client side of an exchange: an HTTP/1.1 connection or an HTTP/2 stream."""

    client_address: str

    def response_head(
        self,
        exchange: Exchange,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body_kind: str,
    ) -> None:
        """``body_kind``: none, length (a Content-Length is among the headers), chunked or close."""

    def response_body(self, data: bytes) -> None: ...

    def response_end(self, exchange: Exchange) -> None: ...

    def response_abort(self, exchange: Exchange) -> None: ...

    def local_response(self, exchange: Exchange, status: int, message: str) -> None: ...

    def tunnel_start(self, exchange: Exchange, rest: bytes) -> None: ...

    def tunnel_data(self, data: bytes) -> None: ...

    def pause_reading(self, paused: bool) -> None: ...

    def flush(self) -> None:
        """Send what the last events wrote."""


def build_request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    client_address: str,
    scheme: bytes,
    host: bytes,
    body: str,
    upgrade: bytes | None,
) -> bytes:
    """The HTTP/1.1 request head sent upstream; ``body`` is none, length or chunked."""
    forwarded_for = b""
    connection_tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            connection_tokens.update(t.strip().lower() for t in value.split(b","))
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_tokens:
            continue
        if lower in FORWARDED:
            if lower == b"x-forwarded-for":
                forwarded_for = value + b", "
            continue
        if lower == b"content-length" and body != "length":
            continue
        parts += (name, b": ", value, b"\r\n")
    parts += (
        b"X-Forwarded-For: ",
        forwarded_for,
        client_address.encode(),
        b"\r\nX-Forwarded-Proto: ",
        scheme,
        b"\r\nX-Forwarded-Host: ",
        host,
        b"\r\n",
    )
    if body == "chunked":
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class Exchange:
    """One request and its response."""

    __slots__ = (
        "backend",
        "body_done",
        "body_framing",
        "body_kind",
        "buffer",
        "buffered",
        "client_keep_alive",
        "core",
        "downstream",
        "failed_backend",
        "head",
        "header_timer",
        "host",
        "keep_alive",
        "method",
        "path",
        "received",
        "replayable",
        "response_started",
        "retried",
        "route",
        "sent",
        "sent_upstream",
        "started",
        "state",
        "status",
        "upgrade",
        "upstream",
    )

    def __init__(
        self,
        core: ProxyCore,
        downstream: Downstream,
        route: Route,
        method: bytes,
        path: bytes,
        host: str,
        head: bytes,
        body_framing: str,
        upgrade: bool,
    ) -> None:
        self.core = core
        self.downstream = downstream
        self.route = route
        self.method = method
        self.path = path
        self.host = host
        self.head = head
        self.body_framing = body_framing
        self.upgrade = upgrade
        self.body_done = body_framing == "none"
        self.client_keep_alive = True  # the HTTP/1.1 downstream's to use
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.replayable = True
        self.backend: BackendState | None = None
        self.failed_backend: BackendState | None = None
        self.upstream: UpstreamConnection | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.response_started = False
        self.keep_alive = False
        self.body_kind = "none"
        self.sent_upstream = False
        self.retried = False
        self.started = time.monotonic()
        self.state = "new"  # new, connecting, sent, done
        self.status = 0
        self.received = 0
        self.sent = 0

    # ------------------------------------------------------------ start

    def start(self) -> None:
        route = self.route
        route.counters.requests_total += 1
        route.counters.active += 1
        route.metrics.active.inc()
        backend = pick(route, self.core.balancing)
        if backend is None:
            self._local(503, "no backend of this service is in rotation; try again shortly")
            return
        self._use(backend)

    def _use(self, backend: BackendState) -> None:
        if self.backend is not None:
            self.backend.active -= 1
        self.backend = backend
        backend.active += 1
        connection = self.core.pool.take(backend)
        if connection is not None:
            self._attach(connection)
            return
        self.state = "connecting"
        self.core.spawn(self._connect(backend))

    async def _connect(self, backend: BackendState) -> None:
        try:
            connection = await self.core.pool.connect(backend)
        except TimeoutError:
            self._failed_before_response(backend, "timeout", fresh=True)
            return
        except OSError:
            self._failed_before_response(backend, "connect", fresh=True)
            return
        if self.state == "done" or self.backend is not backend:
            self.core.pool.release(connection)
            return
        self._attach(connection)

    def _attach(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        connection.exchange = self
        self.state = "sent"
        self.sent_upstream = True
        parts = [self.head]
        if self.body_framing == "chunked":
            for chunk in self.buffer:
                parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            if self.body_done:
                parts.append(b"0\r\n\r\n")
        else:
            parts += self.buffer
        if not self.replayable:
            self.buffer = []
        connection.write(b"".join(parts) if len(parts) > 1 else self.head)
        if self.body_done:
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self.header_timer is None and not self.upgrade:
            self.header_timer = self.core.loop.call_later(
                self.core.settings.response_header_timeout, self._header_timeout
            )

    # ------------------------------------------------------------ request body

    def request_body(self, data: bytes) -> None:
        self.received += len(data)
        if self.replayable or self.upstream is None:
            self.buffer.append(data)
            self.buffered += len(data)
            if self.buffered > REPLAY_LIMIT and self.upstream is not None:
                self.replayable = False
                self.buffer = []
        upstream = self.upstream
        if upstream is not None:
            if self.body_framing == "chunked":
                upstream.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                upstream.write(data)

    def request_end(self) -> None:
        if self.body_done:
            return
        self.body_done = True
        upstream = self.upstream
        if upstream is not None:
            if self.body_framing == "chunked":
                upstream.write(b"0\r\n\r\n")
            self._arm_header_timer()

    # ------------------------------------------------------------ response

    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        if status < 200 and status != 101:
            return  # 100 Continue and friends: the final response follows
        self.status = status
        self.response_started = True
        self.keep_alive = keep_alive
        body_kind = "close"
        if self.method == b"HEAD" or status in (101, 204, 304):
            body_kind = "none"
        else:
            for name, value in headers:
                lower = name.lower()
                if lower == b"content-length":
                    body_kind = "length"
                    break
                if lower == b"transfer-encoding" and b"chunked" in value.lower():
                    body_kind = "chunked"
                    break
        self.body_kind = body_kind
        self.downstream.response_head(self, status, reason, headers, body_kind)
        if self.method == b"HEAD" and self.state != "done":
            # httptools would wait for the body a HEAD response's Content-Length
            # announces: end here, and do not reuse that connection.
            self.keep_alive = False
            self.response_end()

    def response_body(self, data: bytes) -> None:
        self.sent += len(data)
        self.downstream.response_body(data)

    def response_end(self) -> None:
        if self.state == "done" or self.status == 101:
            return  # after a 101 the connection is a tunnel, not a finished response
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            if self.body_done and self.keep_alive:
                self.core.pool.release(upstream)
            else:
                upstream.close()
        self._finish()
        self.downstream.response_end(self)

    def upstream_upgraded(self, rest: bytes) -> None:
        """The backend switched protocols (a WebSocket): splice from now on."""
        if self.status != 101:
            self.upstream_failed("invalid", "the backend switched protocols without a 101")
            return
        self.downstream.tunnel_start(self, rest)

    def tunnel_from_upstream(self, data: bytes) -> None:
        self.sent += len(data)
        self.downstream.tunnel_data(data)

    def tunnel_to_upstream(self, data: bytes) -> None:
        self.received += len(data)
        if self.upstream is not None:
            self.upstream.write(data)

    def tunnel_closed(self) -> None:
        """Either side of a spliced connection went away: end both."""
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.close()
        if self.state != "done":
            self._finish()

    def downstream_pause_reading(self, paused: bool) -> None:
        self.downstream.pause_reading(paused)

    def pause_upstream(self, paused: bool) -> None:
        """The client reads slower than the backend sends."""
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None and not upstream.closed:
            if paused:
                upstream.transport.pause_reading()
            else:
                upstream.transport.resume_reading()

    # ------------------------------------------------------------ failures

    def upstream_lost(self) -> None:
        """The backend's connection closed while it served this exchange."""
        if self.state == "done":
            return
        connection = self.upstream
        self.upstream = None
        if self.status == 101:
            self.downstream.response_abort(self)
            self._finish()
            return
        if self.response_started:
            if self.body_kind == "close":
                self.response_end()  # the backend ended its body by closing, as it may
                return
            self.downstream.response_abort(self)
            self._finish()
            return
        assert self.backend is not None
        reused = connection is not None and connection.reused
        self._failed_before_response(self.backend, "reset", fresh=not reused)

    def upstream_failed(self, kind: str, message: str) -> None:
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.close()
        self.route.metrics.backend_failure(kind)
        if self.response_started:
            self.downstream.response_abort(self)
            self._finish()
        else:
            self._local(502, message)

    def _failed_before_response(self, backend: BackendState, kind: str, *, fresh: bool) -> None:
        if self.state == "done":
            return
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        can_replay = not self.sent_upstream or (self.method in IDEMPOTENT and self.replayable)
        if not fresh and can_replay:
            # A pooled connection the backend had closed: not the backend's fault.
            self.sent_upstream = False
            self._use(backend)
            return
        self.route.metrics.backend_failure(kind)
        if not self.retried and can_replay:
            self.retried = True
            other = pick(self.route, self.core.balancing, exclude=backend)
            if other is not None:
                self.failed_backend = backend
                self.sent_upstream = False
                self._use(other)
                return
        if kind == "timeout":
            self._local(504, "the backend did not accept the connection in time")
        else:
            self._local(502, "the backend closed the connection or refused it")

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.state == "done" or self.response_started:
            return
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.abort()
        self.route.metrics.backend_failure("timeout")
        self._local(504, "the backend did not answer in time")

    def cancel(self) -> None:
        """The client went away: drop the backend connection (its state is unknown)."""
        if self.state == "done":
            return
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.abort()
        if self.status == 0:
            self.status = 499  # nginx's "client closed request", for the log
        self._finish()

    # ------------------------------------------------------------ the end

    def _local(self, status: int, message: str) -> None:
        self.status = status
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.close()
        self._finish()
        self.downstream.local_response(self, status, message)

    def _finish(self) -> None:
        if self.state == "done":
            return
        self.state = "done"
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        route = self.route
        route.counters.active -= 1
        route.metrics.active.dec()
        if self.backend is not None:
            self.backend.active -= 1
        elapsed = time.monotonic() - self.started
        route.metrics.request_done(self.status, elapsed, self.received, self.sent)
        if self.core.access_log:
            access_log.info(
                '%s %s "%s %s" %d %d %.1fms %s',
                self.downstream.client_address,
                self.host or "-",
                self.method.decode("latin-1"),
                self.path.decode("latin-1"),
                self.status,
                self.sent,
                elapsed * 1000,
                self.backend.key if self.backend is not None else "-",
            )


class LocalReply:
    """A request proxyd answers itself (no route: 404; a bad request: 400)."""

    upgrade = False
    path_hint = ""

    def __init__(
        self,
        downstream: Downstream,
        status: int,
        message: str,
        *,
        method: bytes,
        path: bytes,
        host: str,
        body_done: bool,
        log: bool,
    ) -> None:
        self.downstream = downstream
        self.status = status
        self.message = message
        self.method = method
        self.path = path
        self.host = host
        self.body_done = body_done
        self.client_keep_alive = True
        self.state = "new"
        self.log = log

    def start(self) -> None:
        self.state = "done"
        if self.log:
            access_log.info(
                '%s %s "%s %s" %d 0 0.0ms -',
                self.downstream.client_address,
                self.host or "-",
                self.method.decode("latin-1"),
                self.path.decode("latin-1"),
                self.status,
            )
        self.downstream.local_response(self, self.status, self.message)  # type: ignore[arg-type]

    def request_body(self, data: bytes) -> None:
        pass

    def request_end(self) -> None:
        self.body_done = True

    def cancel(self) -> None:
        self.state = "done"
