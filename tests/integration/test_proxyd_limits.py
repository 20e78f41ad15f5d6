"""zlayer-proxyd refuses hostile clients: oversized or endless request heads, floods of connections
and of udp sources. Against a real proxyd, real backends and raw sockets.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import struct
import threading
import time
from typing import Any

import psutil
import pytest

from tests.integration.test_proxyd import (
    BACKENDS,
    Backends,
    Proxyd,
    free_port,
    service,
)
from tests.integration.test_proxyd import (
    backends as backends,  # the fixtures, for this module
)
from tests.integration.test_proxyd import (
    proxyd as proxyd,
)
from tests.integration.test_proxyd_streams import EchoServers
from tests.integration.test_proxyd_streams import echo as echo


def read_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything proxyd sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    answer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        answer += data
    return answer


def status_of(answer: bytes) -> int:
    found = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert found, answer[:200]
    return int(found[1])


def one_request(sock: socket.socket, path: str = "/") -> bytes:
    """A complete keep-alive request on ``sock`` and its answer (Content-Length framed)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def serve_web(proxyd: Proxyd, backends: Backends, **settings: Any) -> None:
    proxyd.configure(**settings)
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.http(backends.port)], BACKENDS[:1])])


def connect(proxyd: Proxyd) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxyd.http_port), timeout=10)


def test_a_huge_header_gets_431_and_memory_stays_bounded(
    proxyd: Proxyd, backends: Backends
) -> None:
    serve_web(proxyd, backends)
    assert proxyd.process is not None
    process = psutil.Process(proxyd.process.pid)
    with connect(proxyd) as sock:  # warm up: the first request imports and allocates
        assert status_of(one_request(sock)) == 200
    before = process.memory_info().rss
    peak = before
    sending = True

    def sample() -> None:
        nonlocal peak
        while sending:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with connect(proxyd) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
            try:
                for _ in range(8):  # 32 MiB of one header value, 1 MiB at a time
                    sock.sendall(b"a" * (1024 * 1024))
            except OSError:
                pass  # cut off once it lingered long enough: fine, the answer came first
            answer = read_answer(sock)
    finally:
        sending = False
        sampler.join()
    assert status_of(answer) == 431, answer
    assert b"Connection: close" in answer
    assert peak - before < 16 * 1024 * 1024, (before, peak)
    metrics = proxyd.metrics()
    assert 'zlayer_proxy_requests_refused_total{listener="http",reason="head_too_large"} 1.0' in (
        metrics
    )


def test_a_thousand_headers_get_431_and_a_long_request_line_414(
    proxyd: Proxyd, backends: Backends
) -> None:
    serve_web(proxyd, backends)
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
    with connect(proxyd) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        answer = read_answer(sock)
    assert status_of(answer) == 431, answer
    assert b"more than 100 header fields" in answer
    with connect(proxyd) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_answer(sock)
    assert status_of(answer) == 414, answer
    # A head just under the limit is served (in fields the backend takes: 8 KiB at most).
    with connect(proxyd) as sock:
        big = b"".join(b"X-Big-%d: %b\r\n" % (i, b"b" * 8000) for i in range(7))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
        assert status_of(sock.recv(65536)) == 200


def test_a_dripped_head_gets_408_within_the_deadline_and_idle_keep_alive_is_left_alone(
    proxyd: Proxyd, backends: Backends
) -> None:
    serve_web(proxyd, backends, request_head_timeout=1.0)
    with connect(proxyd) as sock:
        # A kept-alive connection idle past the head deadline, with no byte sent,
        # is still served: idle is not a slow head.
        assert status_of(one_request(sock)) == 200
        time.sleep(2.5)
        assert status_of(one_request(sock)) == 200
        # The next request's head drips in, a byte every half second: the
        # deadline runs from its first byte and the drip does not extend it.
        started = time.monotonic()
        answer = b""
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            ready, _, _ = select.select([sock], [], [], 0.5)
            if ready:
                answer = read_answer(sock)
                break
        elapsed = time.monotonic() - started
    assert status_of(answer) == 408, answer
    assert b"Connection: close" in answer
    assert elapsed < 4.0  # the 1 s deadline, swept once a second, and slack


def test_connections_past_the_cap_are_closed_counted_and_logged_once(
    proxyd: Proxyd, backends: Backends
) -> None:
    serve_web(proxyd, backends, max_connections=3)
    held = [connect(proxyd) for _ in range(3)]
    try:
        for sock in held:
            assert status_of(one_request(sock)) == 200
        for _ in range(3):
            with connect(proxyd) as extra:
                with contextlib.suppress(OSError):
                    extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_answer(extra) == b""  # closed at once, never served
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # proxyd notices the close on its next loop turn
            with connect(proxyd) as again:
                try:
                    answer = one_request(again)
                    break
                except (AssertionError, OSError):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        assert status_of(answer) == 200
    finally:
        for sock in held:
            sock.close()
    metrics = proxyd.metrics()
    port = proxyd.http_port
    refused = re.search(
        rf'zlayer_proxy_connections_refused_total\{{listener="http",port="{port}",'
        rf'reason="limit"\}} (\S+)',
        metrics,
    )
    assert refused and float(refused[1]) >= 3, metrics
    proxyd.stop()
    warnings = [line for line in proxyd.logs.splitlines() if "max_connections" in line]
    assert len(warnings) == 1, proxyd.logs


def test_udp_sessions_past_the_cap_evict_the_idle_longest(
    proxyd: Proxyd,
    echo: EchoServers,
) -> None:
    proxyd.configure(udp_max_sessions=2)
    proxyd.start()
    udp_port = free_port(kind=socket.SOCK_DGRAM)
    endpoint = {
        "name": "dns",
        "protocol": "udp",
        "port": udp_port,
        "target_port": echo.port,
        "expose": "public",
        "stream": {"session_timeout": "60s", "proxy_protocol": True},  # served by proxyd
    }
    proxyd.push("demo", [service("dns", [endpoint], ["127.0.0.2"])])
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
    try:
        for number, client in enumerate(clients):
            client.settimeout(5)
            client.sendto(b"hello %d" % number, ("127.0.0.1", udp_port))
            answer = client.recv(65536)
            assert answer.startswith(b"127.0.0.2 ") and answer.endswith(b"hello %d" % number)
        (stats,) = proxyd.stats()
        assert stats.active_connections == 2  # sessions, each with its backend socket
        # The newest client keeps its session.
        clients[-1].sendto(b"again", ("127.0.0.1", udp_port))
        assert clients[-1].recv(65536).endswith(b"again")
    finally:
        for client in clients:
            client.close()
    assert proxyd.stats()[0].active_connections == 2
    evicted = re.search(
        r'zlayer_proxy_udp_sessions_evicted_total\{deployment="demo",endpoint="dns",'
        r'service="dns"\} (\S+)',
        proxyd.metrics(),
    )
    assert evicted and float(evicted[1]) == 4.0, proxyd.metrics()


@pytest.mark.parametrize("setting", ["max_head_size = 10", "request_head_timeout = 0"])
def test_a_bad_limit_in_the_settings_is_a_one_sentence_error(proxyd: Proxyd, setting: str) -> None:
    path = proxyd.paths.daemon_config("proxyd")
    path.write_text(path.read_text() + setting + "\n")
    process = proxyd.notify.start("proxyd", proxyd.bus)
    _, err = process.communicate(timeout=20)
    assert process.returncode != 0
    assert setting.split()[0] in err and "Traceback" not in err, err


def h2_request(port: int, headers: list[tuple[str, str]]) -> int | str:
    """One GET over HTTP/2 with extra ``headers``: its status, or "closed" for a connection end."""
    import ssl

    import h2.connection
    import h2.events

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="x") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        pseudo = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")]
        conn.send_headers(stream, pseudo + headers, end_stream=True)
        tls.sendall(conn.data_to_send())
        while True:
            try:
                data = tls.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return "closed"
            if not data:
                return "closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.ConnectionTerminated):
                    return "closed"
            tls.sendall(conn.data_to_send())


def test_http2_heads_past_the_limits_are_refused(proxyd: Proxyd, backends: Backends) -> None:
    proxyd.configure(max_head_size=16384)
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.https(backends.port)], BACKENDS[:1])])
    assert h2_request(proxyd.https_port, [("x-small", "v")]) == 200
    many = [(f"x-h{i}", "v") for i in range(150)]
    assert h2_request(proxyd.https_port, many) == 431
    assert h2_request(proxyd.https_port, [("x-big", "b" * 32768)]) == "closed"


def test_a_silent_tls_handshake_is_cut_off_at_the_head_deadline(
    proxyd: Proxyd, backends: Backends
) -> None:
    proxyd.configure(request_head_timeout=1.0)
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.https(backends.port)], BACKENDS[:1])])
    with socket.create_connection(("127.0.0.1", proxyd.https_port), timeout=10) as sock:
        started = time.monotonic()
        assert read_answer(sock, timeout=10) == b""  # closed, having said nothing
        assert time.monotonic() - started < 4.0


def test_tcp_stream_connections_past_the_cap_are_closed(
    proxyd: Proxyd,
    echo: EchoServers,
) -> None:
    proxyd.configure(max_connections=2)
    proxyd.start()
    tcp_port = free_port()
    endpoint = {
        "name": "raw",
        "protocol": "tcp",
        "port": tcp_port,
        "target_port": echo.port,
        "expose": "public",
        "stream": {"proxy_protocol": True},  # served by proxyd
    }
    proxyd.push("demo", [service("raw", [endpoint], ["127.0.0.2"])])
    held = [socket.create_connection(("127.0.0.1", tcp_port), timeout=10) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"ping")
            answer = b""
            while not answer.endswith(b"ping"):
                answer += sock.recv(65536)
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as extra:
            with contextlib.suppress(OSError):
                extra.sendall(b"ping")
            assert read_answer(extra) == b""
    finally:
        for sock in held:
            sock.close()
    refused = re.search(
        rf'zlayer_proxy_connections_refused_total\{{listener="tcp",port="{tcp_port}",'
        rf'reason="limit"\}} (\S+)',
        proxyd.metrics(),
    )
    assert refused and float(refused[1]) == 1.0


def test_a_client_that_pipelines_and_leaves_is_forgotten(
    proxyd: Proxyd, backends: Backends
) -> None:
    serve_web(proxyd, backends)
    with connect(proxyd) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
        # The first request waits on its backend; the other two wait their turn.
        sock.sendall(
            b"GET /?sleep=0.5 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        deadline = time.monotonic() + 5
        while backends.hits[BACKENDS[0]] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    time.sleep(1.0)
    (stats,) = proxyd.stats()
    assert stats.active_connections == 0, stats
    assert "-1.0" not in proxyd.metrics().split("zlayer_proxy_active_connections{")[1][:200]


def test_a_huge_header_over_tls_gets_431(proxyd: Proxyd, backends: Backends) -> None:
    import ssl

    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.https(backends.port)], BACKENDS[:1])])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", proxyd.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="x") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        with contextlib.suppress(OSError):
            for _ in range(8):
                tls.sendall(b"a" * (1024 * 1024))
        answer = b""
        with contextlib.suppress(OSError):
            while data := tls.recv(65536):
                answer += data
    assert status_of(answer) == 431, answer
