"""HTTP/1.1 from clients: keep-alive, pipelining and WebSocket upgrades, plain and over TLS.

One :class:`ClientConnection` per client connection parses requests with
httptools and runs them one after another as :class:`Exchange` objects
(pipelined requests wait their turn with reading paused). On a TLS
listener a client that chose ``h2`` by ALPN is handed to
:class:`~daemons.proxyd.http2.Http2Connection` instead.

Hostile clients are refused, and what they send past a limit is never kept:

- a request line and headers are fed to the parser at most ``max_head_size``
  bytes at a time; a head that is not complete by then gets 431 (414 while
  still in the request line), as does a request with more than
  ``max_headers`` fields. The same byte budget bounds a chunked body's
  framing and trailers between two pieces of body (past it: 400);
- a head that is not complete ``request_head_timeout`` after its first byte
  gets 408 (bytes trickling in do not extend it);
- a listener with ``max_connections`` open closes new ones at once.

Each of those answers closes the connection after a short linger, reading
and dropping what the client still sends, so it reads the answer rather
than a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from daemons.proxyd.exchange import Exchange, LocalReply, ProxyCore, build_request_head
from daemons.proxyd.limits import ConnectionLimit
from daemons.proxyd.metrics import REQUESTS_REFUSED, UNROUTED
from daemons.proxyd.routes import Route, normalize_host

if TYPE_CHECKING:
    from daemons.proxyd.http2 import Http2Connection

# Response headers that describe the backend's hop, replaced by ours.
_RESPONSE_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"trailer",
        b"upgrade",
    }
)
_REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

Work = Exchange | LocalReply
LINGER = 2.0  # seconds a refused client may go on sending before it is cut off


class _Refused(Exception):
    """Raised from a parser callback: stop parsing and answer ``status``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class Listener:
    """What a client connection needs to know about the listener that accepted it."""

    def __init__(self, core: ProxyCore, secure: bool, port: int) -> None:
        self.core = core
        self.secure = secure
        self.port = port
        self.scheme = b"https" if secure else b"http"
        self.name = "https" if secure else "http"
        self.connections: set[ClientConnection | Http2Connection] = set()
        self.limit = ConnectionLimit(self.name, port, core.settings.max_connections)

    def on_node(self, transport: asyncio.BaseTransport) -> bool:
        """Whether the connection came to the node network's address (internal routes too)."""
        local = transport.get_extra_info("sockname")
        node = self.core.node_address
        return bool(node and local and local[0] == node)

    def match(self, on_node: bool, host: str, path: str) -> Route | None:
        """The route of this port for a request, or None."""
        ports = self.core.routes.table.ports.get(self.port)
        if ports is None or ports.secure != self.secure:
            return None  # the port is going away, or turning from plain to TLS
        return ports.match(on_node, host, path)

    def sweep(self, idle_timeout: float) -> None:
        """Close keep-alive connections idle for ``idle_timeout``; answer overdue heads 408."""
        now = time.monotonic()
        deadline = now - idle_timeout
        head_deadline = now - self.core.settings.request_head_timeout
        for connection in list(self.connections):
            if connection.head_overdue(head_deadline):
                connection.head_timeout()
            elif connection.idle_since(deadline):
                connection.close()


class ClientConnection(asyncio.Protocol):
    """One client's HTTP/1.1 connection."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.core = listener.core
        self.transport: asyncio.Transport | None = None
        self.client_address = "-"
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.parsing: Work | None = None
        self.current: Work | None = None
        self.waiting: deque[Work] = deque()
        self.tunnel: Exchange | None = None
        self.tunnel_pending: list[bytes] = []
        self.chunked_out = False
        self.out: list[bytes] = []
        self.closing = False
        self.last_active = time.monotonic()
        self.h2: Http2Connection | None = None
        self.upgrading = False
        self.on_node = False
        self.opened = time.monotonic()
        self.requests = 0  # begun on this connection
        self.in_message = False  # a request is being read
        settings = self.core.settings
        self.max_head = settings.max_head_size
        self.max_headers = settings.max_headers
        self.head_open = True  # waiting for (the rest of) a request head
        self.head_bytes = 0  # fed to the parser since its last sign of progress
        self.head_since: float | None = None  # the first byte of the head being read
        self.line_ended = False  # the request line of the head being read has ended
        self.header_count = 0

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self.transport = cast(asyncio.Transport, transport)
        if self.listener.limit.full(len(self.listener.connections)):
            self.closing = True
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_address = str(peer[0])
        self.on_node = self.listener.on_node(transport)
        if self.listener.secure:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                from daemons.proxyd.http2 import Http2Connection

                self.h2 = Http2Connection(
                    self.listener, self.transport, self.client_address, self.on_node
                )
                self.h2.start()
                return
        self.listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.h2 is not None:
            self.h2.data_received(data)
            return
        now = self.last_active = time.monotonic()
        if self.tunnel is not None:
            self.tunnel.tunnel_to_upstream(data)
            return
        if self.closing:
            return  # refused or closing: what follows is dropped
        if self.upgrading:
            self.tunnel_pending.append(data)  # for the backend, once it switches protocols
            return
        if self.head_open and self.head_since is None:
            self.head_since = now
        start = 0
        size = len(data)
        while start < size:
            # At most the head budget left at a time: the parser keeps an
            # unfinished header in memory, and must never keep more than that.
            room = self.max_head - self.head_bytes
            if room <= 0:
                self._over_budget()
                return
            end = min(size, start + room)
            piece = data if end - start == size else memoryview(data)[start:end]
            if self.head_open and not self.line_ended and data.find(b"\n", start, end) != -1:
                self.line_ended = True
            self.head_bytes += end - start  # progress callbacks set it back to 0
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as upgrade:
                self.upgrading = True
                rest = data[start + upgrade.args[0] :]
                if rest:
                    self.tunnel_pending.append(rest)
                return
            except httptools.HttpParserCallbackError as exc:
                refused = exc.__context__
                if isinstance(refused, _Refused) and self.head_open:
                    self._refuse(refused.status, refused.reason, refused.message)
                elif isinstance(refused, _Refused):
                    self._bad_request(refused.message)
                else:
                    self._bad_request(str(exc) or "it could not be parsed")
                return
            except httptools.HttpParserError as exc:
                self._bad_request(str(exc) or "it could not be parsed")
                return
            if self.closing:
                return
            start = end

    def _over_budget(self) -> None:
        """``max_head_size`` bytes fed and the head (or a body's framing) still not done."""
        limit = self.max_head
        if not self.head_open:
            self._bad_request(
                f"a chunk header or the trailers of its body are longer than {limit} bytes"
            )
        elif not self.line_ended:
            self._refuse(
                414,
                "request_line_too_long",
                f"the request line is longer than {limit} bytes; use a shorter URL",
            )
        else:
            self._refuse(
                431,
                "head_too_large",
                f"the request's headers are larger than {limit} bytes; send smaller headers",
            )

    def head_overdue(self, deadline: float) -> bool:
        """Whether the head being read began before ``deadline``."""
        return self.head_since is not None and self.head_since < deadline and not self.closing

    def head_timeout(self) -> None:
        """``request_head_timeout`` passed and the head is not complete: 408."""
        if self.current is not None or self.waiting:
            # Earlier requests are still being answered, with reading paused
            # for them: the head has its full time once they are done.
            self.head_since = time.monotonic()
            return
        seconds = self.core.settings.request_head_timeout
        self._refuse(
            408,
            "head_timeout",
            f"the request's headers did not arrive within {seconds:g} seconds; "
            "send the whole request at once",
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.h2 is not None:
            self.h2.connection_lost()
            return
        self.listener.connections.discard(self)
        self.closing = True
        if self.tunnel is not None:
            self.tunnel.tunnel_closed()
            self.tunnel = None
        if self.current is not None:
            self.current.cancel()
        # The waiting ones never started (nothing was counted for them), and
        # the one being parsed is one of those two.
        self.current = self.parsing = None
        self.waiting.clear()

    def pause_writing(self) -> None:
        if self.h2 is not None:
            return  # HTTP/2 has its own flow control
        current = self.current
        if isinstance(current, Exchange):
            current.pause_upstream(True)

    def resume_writing(self) -> None:
        current = self.current
        if isinstance(current, Exchange):
            current.pause_upstream(False)

    def idle_since(self, deadline: float) -> bool:
        return (
            self.current is None
            and self.tunnel is None
            and not self.waiting
            and self.last_active < deadline
        )

    def drainable(self, first_request_wait: float) -> bool:
        """Whether a stopping proxy may close this connection now.

        Not while a request is under way, nor while a new connection may
        still send its first one (it was accepted: it is owed an answer).
        """
        if self.h2 is not None or self.in_message:
            return False
        fresh = self.requests == 0 and time.monotonic() - self.opened < first_request_wait
        return self.idle_since(float("inf")) and not fresh

    def close(self) -> None:
        self.closing = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self.requests += 1
        self.in_message = True
        self.url = b""
        self.headers = []
        self.header_count = 0
        if self.head_since is None:
            self.head_since = self.last_active  # pipelined: it began with the bytes just read

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1  # trailers count too
        if self.header_count > self.max_headers:
            raise _Refused(
                431,
                "too_many_headers",
                f"the request has more than {self.max_headers} header fields; send fewer",
            )
        self.headers.append((name, value))

    def on_chunk_header(self) -> None:
        self.head_bytes = 0

    def on_chunk_complete(self) -> None:
        self.head_bytes = 0

    def on_headers_complete(self) -> None:
        self.head_open = False
        self.head_bytes = 0
        self.head_since = None
        parser = self.parser
        method = parser.get_method()
        url = self.url
        host = b""
        framing = "none"
        upgrade_token: bytes | None = None
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"host":
                host = value
            elif lower == b"content-length":
                if framing == "none":
                    framing = "length"
            elif lower == b"transfer-encoding":
                framing = "chunked"
            elif lower == b"upgrade":
                upgrade_token = value
        upgrade = bool(parser.should_upgrade()) and upgrade_token is not None
        if not url.startswith(b"/"):
            # absolute-form (a client that thinks we are a forward proxy) or "*"
            try:
                parsed = httptools.parse_url(url)
                host = host or parsed.host or b""
                url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            except httptools.HttpParserInvalidURLError:
                pass
        host_name = normalize_host(host.decode("latin-1"))
        query = url.find(b"?")
        path = (url if query == -1 else url[:query]).decode("latin-1")
        listener = self.listener
        route = listener.match(self.on_node, host_name, path)
        work: Work
        if route is None:
            UNROUTED.labels(listener.name).inc()
            work = LocalReply(
                self,
                404,
                f"no route for host {host_name or '(none)'} and path {path}",
                method=method,
                path=url,
                host=host_name,
                body_done=framing == "none",
                log=self.core.access_log,
            )
        else:
            head = build_request_head(
                method,
                url,
                self.headers,
                client_address=self.client_address,
                scheme=listener.scheme,
                host=host,
                body=framing,
                upgrade=upgrade_token if upgrade else None,
            )
            work = Exchange(self.core, self, route, method, url, host_name, head, framing, upgrade)
        work.client_keep_alive = bool(parser.should_keep_alive()) and not upgrade
        self.parsing = work
        if self.current is None:
            self.current = work
            work.start()
        else:
            self.waiting.append(work)
            if self.transport is not None:
                self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.head_bytes = 0
        if self.parsing is not None:
            self.parsing.request_body(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.head_open = True
        self.head_bytes = 0
        self.head_since = None
        self.line_ended = False
        parsing = self.parsing
        if parsing is not None:
            self.parsing = None
            parsing.request_end()

    # ------------------------------------------------------------ downstream, for the exchange

    def response_head(
        self,
        exchange: Exchange,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body_kind: str,
    ) -> None:
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason or b"-")]
        for name, value in headers:
            if name.lower() in _RESPONSE_HOP:
                if status == 101 and name.lower() == b"upgrade":
                    parts += (name, b": ", value, b"\r\n")
                continue
            parts += (name, b": ", value, b"\r\n")
        self.chunked_out = False
        if body_kind in ("chunked", "close"):
            self.chunked_out = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if status == 101:
            parts.append(b"Connection: Upgrade\r\n")
        elif not exchange.client_keep_alive or self.core.draining:
            exchange.client_keep_alive = False  # stopping: this answer is the connection's last
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        self._write(b"".join(parts))

    def response_body(self, data: bytes) -> None:
        if self.chunked_out:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)

    def response_end(self, exchange: Exchange) -> None:
        if self.chunked_out:
            self.chunked_out = False
            self._write(b"0\r\n\r\n")
        self._done(exchange)

    def response_abort(self, exchange: Exchange) -> None:
        # Part of a response was sent: the client must see it end early.
        self.current = None
        self.flush()
        self.close()

    def local_response(self, exchange: Exchange | LocalReply, status: int, message: str) -> None:
        body = message.encode() + b"\n"
        keep = exchange.client_keep_alive and exchange.body_done and not self.core.draining
        exchange.client_keep_alive = keep
        self._write(
            b"HTTP/1.1 %d %b\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%b\r\n%b"
            % (
                status,
                _REASONS.get(status, b"Error"),
                len(body),
                b"" if keep else b"Connection: close\r\n",
                body,
            )
        )
        self.flush()
        self._done(exchange)

    def tunnel_start(self, exchange: Exchange, rest: bytes) -> None:
        self.tunnel = exchange
        self.current = None
        for data in self.tunnel_pending:
            exchange.tunnel_to_upstream(data)
        self.tunnel_pending = []
        if rest:
            self._write(rest)

    def tunnel_data(self, data: bytes) -> None:
        self._write(data)
        self.flush()

    def pause_reading(self, paused: bool) -> None:
        if self.transport is None or self.closing:
            return
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # ------------------------------------------------------------ internals

    def _write(self, data: bytes) -> None:
        # Collected and sent by flush(): a response's head and body in one send.
        self.out.append(data)

    def flush(self) -> None:
        out = self.out
        if not out:
            return
        self.out = []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _done(self, work: Work) -> None:
        if work is not self.current:
            return
        self.current = None
        if not work.client_keep_alive or not work.body_done or work.upgrade:
            if isinstance(work, LocalReply):
                self._linger_close()
            else:
                self.close()
            return
        if self.waiting:
            following = self.waiting.popleft()
            self.current = following
            if not self.waiting and self.transport is not None:
                self.transport.resume_reading()
            following.start()

    def _bad_request(self, why: str) -> None:
        broken = self.parsing
        if broken is not None and broken is not self.current and broken in self.waiting:
            self.waiting.remove(broken)  # never started: it gets the 400, after those before it
            self.parsing = broken = None
        elif (
            isinstance(broken, Exchange) and broken is self.current and not broken.response_started
        ):
            broken.cancel()  # nothing of its answer was sent: the 400 takes its place
            self.current = self.parsing = broken = None
        if broken is None:
            # The requests before it are answered first.
            self._refuse(400, "bad_request", f"the request is not valid HTTP/1.1 ({why})")
        else:
            REQUESTS_REFUSED.labels(self.listener.name, "bad_request").inc()
            self.close()  # in a request's body: that request cannot be finished nor answered

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` once the requests before are answered, then close.

        Nothing the client sends from now on is parsed or kept.
        """
        REQUESTS_REFUSED.labels(self.listener.name, reason).inc()
        self.closing = True
        self.head_since = None
        self.in_message = False  # the rest of it is never read: a stop need not wait for it
        reply = LocalReply(
            self,
            status,
            message,
            method=b"-",
            path=b"-",
            host="",
            body_done=True,
            log=self.core.access_log,
        )
        reply.client_keep_alive = False
        if self.current is None:
            self.current = reply
            reply.start()
        else:
            self.waiting.append(reply)

    def _linger_close(self) -> None:
        """Close after an error answer without losing it to a reset.

        Closing with unread bytes from the client makes the kernel send a
        reset, which can destroy the answer before the client reads it. So
        the write side is shut, what arrives is dropped, and the connection
        is cut once the client closes or after :data:`LINGER` seconds.
        """
        self.closing = True
        self.flush()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()  # TLS: no half-close
            return
        transport.write_eof()
        with contextlib.suppress(RuntimeError):
            transport.resume_reading()  # paused for pipelined requests, perhaps
        self.core.loop.call_later(LINGER, transport.abort)
