"""HTTP/1.1 from clients: keep-alive, pipelining and WebSocket upgrades, plain and over TLS.

One :class:`ClientConnection` per client connection parses requests with
httptools and runs them one after another as :class:`Exchange` objects
(pipelined requests wait their turn with reading paused). On a TLS
listener a client that chose ``h2`` by ALPN is handed to
:class:`~daemons.proxyd.http2.Http2Connection` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from daemons.proxyd.exchange import Exchange, LocalReply, ProxyCore, build_request_head
from daemons.proxyd.metrics import UNROUTED
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
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

Work = Exchange | LocalReply


class Listener:
    """What a client connection needs to know about the listener that accepted it."""

    def __init__(self, core: ProxyCore, secure: bool, port: int) -> None:
        self.core = core
        self.secure = secure
        self.port = port
        self.scheme = b"https" if secure else b"http"
        self.name = "https" if secure else "http"
        self.connections: set[ClientConnection | Http2Connection] = set()

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
        """Close keep-alive connections that have had nothing to do for ``idle_timeout``."""
        deadline = time.monotonic() - idle_timeout
        for connection in [c for c in self.connections if c.idle_since(deadline)]:
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

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self.transport = cast(asyncio.Transport, transport)
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
        self.last_active = time.monotonic()
        if self.tunnel is not None:
            self.tunnel.tunnel_to_upstream(data)
            return
        if self.closing:
            return
        if self.upgrading:
            self.tunnel_pending.append(data)  # for the backend, once it switches protocols
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrading = True
            rest = data[upgrade.args[0] :]
            if rest:
                self.tunnel_pending.append(rest)
        except httptools.HttpParserError as exc:
            self._bad_request(str(exc) or "it could not be parsed")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.h2 is not None:
            self.h2.connection_lost()
            return
        self.listener.connections.discard(self)
        self.closing = True
        if self.tunnel is not None:
            self.tunnel.tunnel_closed()
            self.tunnel = None
        for work in (self.current, *self.waiting):
            if work is not None:
                work.cancel()
        if self.parsing is not None and self.parsing.state == "new":
            self.parsing.cancel()
        self.current = None
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

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
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
        if self.parsing is not None:
            self.parsing.request_body(body)

    def on_message_complete(self) -> None:
        self.in_message = False
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
            self.close()
            return
        if self.waiting:
            following = self.waiting.popleft()
            self.current = following
            if not self.waiting and self.transport is not None:
                self.transport.resume_reading()
            following.start()

    def _bad_request(self, why: str) -> None:
        if self.current is None:
            reply = LocalReply(
                self,
                400,
                f"the request is not valid HTTP/1.1 ({why})",
                method=b"-",
                path=b"-",
                host="",
                body_done=True,
                log=self.core.access_log,
            )
            reply.client_keep_alive = False
            self.current = reply
            reply.start()
        self.close()
