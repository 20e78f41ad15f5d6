"""Keep-alive connections to backends: one HTTP/1.1 exchange at a time each, pooled per backend.

An :class:`UpstreamConnection` parses its backend's responses with
httptools and hands every event to the exchange it currently serves; between
exchanges it waits in the :class:`UpstreamPool` (newest first, so the
warmest connection is reused). A connection the backend closes leaves the
pool at once; one idle longer than ``idle_timeout`` is closed by the sweep.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

import httptools

from daemons.proxyd.routes import BackendState

if TYPE_CHECKING:
    from daemons.proxyd.exchange import Exchange


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to one backend."""

    def __init__(self, pool: UpstreamPool, backend: BackendState) -> None:
        self.pool = pool
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.closed = False
        self.reused = False
        self.upgraded = False
        self.idle_since = 0.0

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes nobody asked for: the backend is confused; do not reuse it.
            self.close()
            return
        if self.upgraded:
            exchange.tunnel_from_upstream(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            rest = data[upgrade.args[0] :]
            if self.exchange is not None:
                self.exchange.upstream_upgraded(rest)
        except httptools.HttpParserError:
            self.exchange = None
            self.close()
            exchange.upstream_failed("invalid", "the backend sent an invalid response")
        # Everything this read produced for the client goes out in one send.
        exchange.downstream.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_lost()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.downstream_pause_reading(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.downstream_pause_reading(False)

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self.headers = []

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_head(
                self.parser.get_status_code(),
                self.reason,
                self.headers,
                self.parser.should_keep_alive(),
            )

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None and not self.upgraded:
            exchange.response_end()

    # ------------------------------------------------------------ use

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections, per backend key."""

    def __init__(self, connect_timeout: float, keep_per_backend: int) -> None:
        self.connect_timeout = connect_timeout
        self.keep_per_backend = keep_per_backend
        self.idle: dict[str, list[UpstreamConnection]] = {}
        self.connections_made = 0

    def take(self, backend: BackendState) -> UpstreamConnection | None:
        idle = self.idle.get(backend.key)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                connection.reused = True
                return connection
        return None

    async def connect(self, backend: BackendState) -> UpstreamConnection:
        """A new connection; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, protocol = await loop.create_connection(
                lambda: UpstreamConnection(self, backend), backend.address, backend.port
            )
        self.connections_made += 1
        return protocol

    def release(self, connection: UpstreamConnection) -> None:
        connection.exchange = None
        if connection.closed:
            return
        idle = self.idle.setdefault(connection.backend.key, [])
        if len(idle) >= self.keep_per_backend:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def discard(self, connection: UpstreamConnection) -> None:
        idle = self.idle.get(connection.backend.key)
        if idle and connection in idle:
            idle.remove(connection)

    def sweep(self, idle_timeout: float) -> None:
        """Close connections idle longer than ``idle_timeout``."""
        deadline = time.monotonic() - idle_timeout
        for idle in self.idle.values():
            for connection in [c for c in idle if c.idle_since < deadline]:
                connection.close()

    def close_backends(self, keys: set[str] | list[str]) -> None:
        for key in keys:
            for connection in self.idle.pop(key, []):
                connection.close()

    def close_all(self) -> None:
        self.close_backends(list(self.idle))
