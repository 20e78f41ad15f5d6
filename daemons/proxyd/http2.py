"""HTTP/2 from clients over TLS (ALPN ``h2``), with the sans-IO ``h2`` library.

Each stream becomes an :class:`Exchange` to an HTTP/1.1 backend, run
concurrently with the connection's other streams. Response bodies respect
the client's flow-control windows: what does not fit waits for a
WINDOW_UPDATE, and a stream holding too much pauses its backend.

A request's header list is bounded by ``max_head_size`` (advertised as
SETTINGS_MAX_HEADER_LIST_SIZE; a larger block ends the connection, as h2
does) and its fields by ``max_headers`` (past it: 431 on the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

from daemons.proxyd.exchange import Exchange, LocalReply, build_request_head
from daemons.proxyd.metrics import REQUESTS_REFUSED, UNROUTED
from daemons.proxyd.routes import normalize_host

if TYPE_CHECKING:
    from daemons.proxyd.http1 import Listener

PENDING_HIGH = 1024 * 1024
# Connection-specific headers are forbidden in HTTP/2 (RFC 9113 8.2.2).
_NOT_IN_H2 = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
    }
)


class Http2Stream:
    """One request stream; the exchange's downstream."""

    def __init__(self, connection: Http2Connection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.client_address = connection.client_address
        self.work: Exchange | LocalReply | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.ended = False
        self.closed = False
        self.upstream_paused = False

    # ------------------------------------------------------------ downstream

    def response_head(
        self,
        exchange: Exchange,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body_kind: str,
    ) -> None:
        out = [(b":status", b"%d" % status)]
        for name, value in headers:
            lower = name.lower()
            if lower not in _NOT_IN_H2:
                out.append((lower, value))
        self._h2(lambda h2: h2.send_headers(self.stream_id, out, end_stream=body_kind == "none"))
        if body_kind == "none":
            self.ended = True
            self.closed = True

    def response_body(self, data: bytes) -> None:
        if self.closed:
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.send_pending()
        if self.pending_bytes > PENDING_HIGH and isinstance(self.work, Exchange):
            self.upstream_paused = True
            self.work.pause_upstream(True)

    def response_end(self, exchange: Exchange) -> None:
        self.ended = True
        self.send_pending()
        self.connection.stream_done(self)

    def response_abort(self, exchange: Exchange) -> None:
        self.reset()

    def local_response(self, exchange: Exchange | LocalReply, status: int, message: str) -> None:
        body = message.encode() + b"\n"
        headers = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
        ]
        self._h2(lambda h2: h2.send_headers(self.stream_id, headers))
        self.pending.append(body)
        self.pending_bytes += len(body)
        self.ended = True
        self.send_pending()
        self.connection.stream_done(self)

    def tunnel_start(self, exchange: Exchange, rest: bytes) -> None:
        self.reset()  # never asked for: upgrades are not forwarded from HTTP/2

    def tunnel_data(self, data: bytes) -> None:
        pass

    def pause_reading(self, paused: bool) -> None:
        pass  # the stream's flow-control window holds the client back

    def flush(self) -> None:
        pass  # every event is flushed through the connection's h2 buffer

    # ------------------------------------------------------------ flow control

    def send_pending(self) -> None:
        if self.closed:
            return
        h2 = self.connection.h2
        try:
            while self.pending:
                window = min(
                    h2.local_flow_control_window(self.stream_id), h2.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = self.pending[0]
                if len(chunk) > window:
                    self.pending[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    self.pending.pop(0)
                self.pending_bytes -= len(chunk)
                h2.send_data(self.stream_id, chunk)
            if self.ended and not self.pending:
                h2.end_stream(self.stream_id)
                self.closed = True
        except H2Error:
            self.closed = True
        self.connection.flush()
        if self.upstream_paused and self.pending_bytes < PENDING_HIGH // 2:
            self.upstream_paused = False
            if isinstance(self.work, Exchange):
                self.work.pause_upstream(False)

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._h2(lambda h2: h2.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR))
        self.connection.stream_done(self)

    def _h2(self, action: object) -> None:
        try:
            action(self.connection.h2)  # type: ignore[operator]
        except H2Error:
            self.closed = True
        self.connection.flush()


class Http2Connection:
    """One client's HTTP/2 connection on the TLS listener."""

    def __init__(
        self, listener: Listener, transport: asyncio.Transport, client_address: str, on_node: bool
    ) -> None:
        self.listener = listener
        self.on_node = on_node
        self.core = listener.core
        self.transport = transport
        self.client_address = client_address
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        head_limit = self.core.settings.max_head_size
        self.h2.local_settings = Settings(
            client=False, initial_values={SettingCodes.MAX_HEADER_LIST_SIZE: head_limit}
        )
        self.h2.decoder.max_header_list_size = head_limit  # what the decoder enforces
        self.streams: dict[int, Http2Stream] = {}
        self.last_active = time.monotonic()

    def start(self) -> None:
        self.listener.connections.add(self)
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def idle_since(self, deadline: float) -> bool:
        return not self.streams and self.last_active < deadline

    def head_overdue(self, deadline: float) -> bool:
        return False  # h2 buffers a header block whole, bounded by its size limit

    def head_timeout(self) -> None:
        pass

    def drainable(self, first_request_wait: float) -> bool:
        """Whether a stopping proxy may close this connection now (no stream open)."""
        return not self.streams

    def close(self) -> None:
        try:
            self.h2.close_connection()
            self.flush()
        except H2Error:
            pass
        self.transport.close()

    def stream_done(self, stream: Http2Stream) -> None:
        if stream.closed or not stream.pending:
            self.streams.pop(stream.stream_id, None)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            self.flush()
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request(event)
            elif isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.work is not None:
                    stream.work.request_body(event.data)
                with contextlib.suppress(H2Error):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.work is not None:
                    stream.work.request_end()
            elif isinstance(event, StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.closed = True
                    if stream.work is not None:
                        stream.work.cancel()
            elif isinstance(event, WindowUpdated):
                targets = (
                    list(self.streams.values())
                    if event.stream_id == 0
                    else [s for s in (self.streams.get(event.stream_id),) if s is not None]
                )
                for stream in targets:
                    if stream.pending:
                        stream.send_pending()
                        self.stream_done(stream)
            elif isinstance(event, ConnectionTerminated):
                self.transport.close()
        self.flush()

    def connection_lost(self) -> None:
        self.listener.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.closed = True
            if stream.work is not None:
                stream.work.cancel()
        self.streams.clear()

    def _request(self, event: RequestReceived) -> None:
        stream = Http2Stream(self, event.stream_id)
        self.streams[event.stream_id] = stream
        max_headers = self.core.settings.max_headers
        fields = sum(1 for name, _ in event.headers or () if not bytes(name).startswith(b":"))
        if fields > max_headers:
            REQUESTS_REFUSED.labels(self.listener.name, "too_many_headers").inc()
            reply = LocalReply(
                stream,
                431,
                f"the request has more than {max_headers} header fields; send fewer",
                method=b"-",
                path=b"-",
                host="",
                body_done=True,
                log=self.core.access_log,
            )
            stream.work = reply
            reply.start()
            return
        method = b"GET"
        path = b"/"
        authority = b""
        headers: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        has_length = False
        has_host = False
        for name, value in event.headers or ():
            name_b = name if isinstance(name, bytes) else name.encode()
            value_b = value if isinstance(value, bytes) else value.encode()
            if name_b.startswith(b":"):
                if name_b == b":method":
                    method = value_b
                elif name_b == b":path":
                    path = value_b
                elif name_b == b":authority":
                    authority = value_b
                continue
            if name_b == b"cookie":
                cookies.append(value_b)  # HTTP/1.1 wants them in one header
                continue
            if name_b == b"content-length":
                has_length = True
            elif name_b == b"host":
                has_host = True
                authority = authority or value_b
            headers.append((name_b, value_b))
        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
        if not has_host and authority:
            headers.insert(0, (b"host", authority))
        framing = (
            "none" if event.stream_ended is not None else ("length" if has_length else "chunked")
        )
        host_name = normalize_host(authority.decode("latin-1"))
        query = path.find(b"?")
        match_path = (path if query == -1 else path[:query]).decode("latin-1")
        route = self.listener.match(self.on_node, host_name, match_path)
        work: Exchange | LocalReply
        if route is None:
            UNROUTED.labels(self.listener.name).inc()
            work = LocalReply(
                stream,
                404,
                f"no route for host {host_name or '(none)'} and path {match_path}",
                method=method,
                path=path,
                host=host_name,
                body_done=True,
                log=self.core.access_log,
            )
        else:
            head = build_request_head(
                method,
                path,
                headers,
                client_address=self.client_address,
                scheme=b"https",
                host=authority,
                body=framing,
                upgrade=None,
            )
            work = Exchange(self.core, stream, route, method, path, host_name, head, framing, False)
        stream.work = work
        work.start()
