"""zlayer-proxyd on a real private bus, with real backends and real clients.

Backends are aiohttp apps (one event loop in a thread) listening on the
same port on several loopback addresses (127.0.0.2, 127.0.0.3 ...), so
each is a distinct ``Backend.address`` as replicas are. Each answers with
the address it was reached on and counts the connections it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from ctl.fdstore import ChildStart, FdStore, receive
from ctl.supervisor import find_executable
from shared.bus import ConflictError, InvalidArgumentError, open_bus
from shared.busdaemon import PrivateBus
from shared.clients import OverlayClient, ProxyClient
from shared.paths import Paths
from shared.wire import convert
from shared.wire.daemon import DaemonStatus
from shared.wire.overlay import NetworkInfo
from shared.wire.traffic import DeploymentTraffic, RouteInfo, ServiceStats
from tests.integration.test_daemon import NotifyListener, start, stop

T = TypeVar("T")


def free_port(address: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def common_free_port(addresses: list[str]) -> int:
    """A port free on every one of ``addresses``."""
    for _ in range(50):
        port = free_port(addresses[0])
        try:
            for address in addresses[1:]:
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


class LoopThread:
    """An event loop in a thread, for servers the test talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Backends:
    """aiohttp backends on several addresses and one port, in a thread."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.port = common_free_port(addresses)
        self.hits: Counter[str] = Counter()
        self.connections: dict[str, set[int]] = {a: set() for a in addresses}
        self.seen_headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.loops = LoopThread()
        self.runner: web.AppRunner | None = None
        self.sites: dict[str, web.TCPSite] = {}
        self.loops.run(self._start())

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._websocket)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        for address in self.addresses:
            site = web.TCPSite(self.runner, address, self.port, reuse_address=True)
            await site.start()
            self.sites[address] = site

    async def _any(self, request: web.Request) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        peer = request.transport.get_extra_info("peername") if request.transport else None
        address = str(sockname[0]) if sockname else "?"
        self.hits[address] += 1
        if peer:
            self.connections.setdefault(address, set()).add(int(peer[1]))
        self.seen_headers.append(dict(request.headers))
        self.paths.append(request.path_qs)
        seconds = float(request.query.get("sleep", "0"))
        if seconds:
            await asyncio.sleep(seconds)
        body = await request.read()
        text = f"{address} {request.method} {request.path_qs} {len(body)}\n"
        return web.Response(text=text, headers={"X-Backend": address})

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str("echo " + message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    def stop_address(self, address: str) -> None:
        site = self.sites.pop(address)
        self.loops.run(site.stop())

    def close(self) -> None:
        if self.runner is not None:
            with contextlib.suppress(Exception):
                self.loops.run(self.runner.cleanup())
        self.loops.close()


def service(
    name: str,
    endpoints: list[dict[str, Any]],
    addresses: list[str],
    deployment: str = "demo",
    health_interval: float = 0.0,
) -> dict[str, Any]:
    return {
        "deployment": deployment,
        "service": name,
        "endpoints": endpoints,
        "backends": [
            {"replica": f"{deployment}-{name}-{i}-r1", "instance": i, "revision": 1, "address": a}
            for i, a in enumerate(addresses, start=1)
        ],
        "health_interval": health_interval,
    }


def http_endpoint(port: int, target: int, **extra: Any) -> dict[str, Any]:
    """A public http endpoint proxyd serves on ``port``, replicas listening on ``target``."""
    return {
        "name": "http",
        "protocol": "http",
        "port": port,
        "target_port": target,
        "expose": "public",
        **extra,
    }


class StoreKeeper:
    """The supervisor's end of the notify socket: readiness lines and a file descriptor store.

    What systemd and ``zlayerctl daemon run`` do for proxyd: keep the
    sockets it stores (``FDSTORE=1``), drop the ones it removes, and pass the
    kept ones to the next process it starts (``LISTEN_FDS``). A thread reads
    the socket all along, as a supervisor does.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.store = FdStore(limit=64)
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.reading = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import select

        while self.reading:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            while (message := receive(self.sock)) is not None:
                with self.lock:
                    self.messages.extend(message.lines)
                    self.store.apply(message)

    def names(self) -> list[str]:
        with self.lock:
            return self.store.names()

    def wait_for(self, line: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if line in self.messages:
                    return
            assert time.monotonic() < deadline, f"no {line!r} within {timeout}s: {self.messages}"
            time.sleep(0.02)

    def start(self, name: str, bus: PrivateBus) -> subprocess.Popen[str]:
        """The daemon as a child, given the kept sockets as systemd gives them."""
        environ = {"ZLAYER_BUS_ADDRESS": bus.address, "NOTIFY_SOCKET": str(self.path)}
        with self.lock:
            child = ChildStart(environ, passed=self.store.passed())
            self.messages.clear()
        with child.reserved():
            return subprocess.Popen(
                [find_executable(f"zlayer-{name}")],
                preexec_fn=child.preexec,
                pass_fds=child.pass_fds,
                stderr=subprocess.PIPE,
                text=True,
            )

    def close(self) -> None:
        self.reading = False
        self.thread.join(5)
        self.store.close()
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Proxyd:
    """One zlayer-proxyd of the test's own prefix and bus, under a supervisor's notify socket."""

    def __init__(self, paths: Paths, bus: PrivateBus, notify: StoreKeeper) -> None:
        self.paths = paths
        self.bus = bus
        self.notify = notify
        self.process: subprocess.Popen[str] | None = None
        # Endpoints are served on their own ports: the tests' http and https ones.
        self.http_port = free_port()
        self.https_port = free_port()
        self.logs = ""
        self.configure()

    def http(self, target: int, **extra: Any) -> dict[str, Any]:
        """A public http endpoint on this proxyd's test port, replicas on ``target``."""
        return http_endpoint(self.http_port, target, **extra)

    def https(self, target: int, **extra: Any) -> dict[str, Any]:
        return {**http_endpoint(self.https_port, target, **extra), "protocol": "https"}

    def configure(self, **settings: Any) -> None:
        lines = [
            "metrics_port = 0",
            'listen_addresses = ["127.0.0.1"]',
        ]
        lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
        self.paths.daemon_config("proxyd").write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.process = self.notify.start("proxyd", self.bus)
        try:
            self.notify.wait_for("READY=1")
        except AssertionError as exc:
            # what held it (seen once in a full run, under load): its log says
            process, self.process = self.process, None
            process.kill()
            _out, err = process.communicate(timeout=10)
            raise AssertionError(f"{exc}\nzlayer-proxyd's log:\n{err[-4000:]}") from None

    def stop(self) -> None:
        if self.process is not None:
            code, err = stop(self.process)
            self.process = None
            self.logs += err
            assert code == 0, err
            assert "Traceback" not in err, err

    def ask(self, call: Callable[[ProxyClient], Awaitable[T]]) -> T:
        """One call of proxyd's typed client, on a connection of its own."""

        async def go() -> T:
            bus = open_bus(self.bus.address)
            try:
                return await call(ProxyClient(bus))
            finally:
                bus.close()

        return asyncio.run(go())

    def push_text(self, deployment: str, text: str) -> None:
        """SetTraffic with any text, a malformed one too (the typed client sends only Structs)."""
        self.ask(lambda client: client._proxy.set_traffic(deployment, text))

    def network(self) -> NetworkInfo:
        """overlayd's GetNetwork."""

        async def go() -> NetworkInfo:
            bus = open_bus(self.bus.address)
            try:
                return await OverlayClient(bus).get_network()
            finally:
                bus.close()

        return asyncio.run(go())

    def status(self) -> DaemonStatus:
        return self.ask(lambda client: client.status())

    def push(self, deployment: str, services: list[dict[str, Any]]) -> None:
        traffic = convert({"deployment": deployment, "services": services}, DeploymentTraffic)
        self.ask(lambda client: client.set_traffic(deployment, traffic))

    def routes(self) -> list[RouteInfo]:
        return self.ask(lambda client: client.list_routes())

    def stats(self) -> list[ServiceStats]:
        return self.ask(lambda client: client.service_stats())

    def metrics(self) -> str:
        url = self.status().metrics_url
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
        return text

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def run(coro_factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_factory())  # type: ignore[arg-type]


def state_dir(paths: Paths) -> Path:
    return paths.daemon_state("proxyd")


# ---------------------------------------------------------------- fixtures

BACKENDS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@pytest.fixture
def backends() -> Any:
    servers = Backends(BACKENDS)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture
def proxyd(zlayer_prefix: Paths, private_bus: PrivateBus) -> Any:
    listener = StoreKeeper(zlayer_prefix.prefix / "notify.sock")
    daemon = Proxyd(zlayer_prefix, private_bus, listener)
    try:
        yield daemon
        daemon.stop()
    finally:
        if daemon.process is not None:
            stop(daemon.process)
        listener.close()


async def fetch(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, str, dict[str, str]]:
    async with session.request(kwargs.pop("method", "GET"), url, **kwargs) as response:
        return response.status, await response.text(), dict(response.headers)


def one_connection() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, force_close=False))


# ---------------------------------------------------------------- tests


def test_round_robin_keep_alive_forwarded_headers_stats_and_metrics(
    proxyd: Proxyd, backends: Backends
) -> None:
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.http(backends.port)], BACKENDS[:2])])
    (route,) = proxyd.routes()
    assert route.listen == f"127.0.0.1:{proxyd.http_port}"
    assert route.backends == [f"{a}:{backends.port}" for a in BACKENDS[:2]]

    async def scenario() -> list[tuple[int, str, dict[str, str]]]:
        async with one_connection() as session:
            return [
                await fetch(session, f"{proxyd.base}/page?n={i}", headers={"Host": "web.test"})
                for i in range(20)
            ]

    answers = run(scenario)
    assert all(status == 200 for status, _, _ in answers)
    served = [body.split()[0] for _, body, _ in answers]
    assert served.count("127.0.0.2") == 10 and served.count("127.0.0.3") == 10
    assert served[:4] in (["127.0.0.2", "127.0.0.3"] * 2, ["127.0.0.3", "127.0.0.2"] * 2)
    # Keep-alive both ways: 20 requests on one client connection took one
    # pooled connection per backend.
    assert len(backends.connections["127.0.0.2"]) == 1
    assert len(backends.connections["127.0.0.3"]) == 1
    headers = backends.seen_headers[-1]
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "web.test"
    assert headers["Host"] == "web.test"

    (stats,) = proxyd.stats()
    assert (stats.deployment, stats.service) == ("demo", "web")
    assert stats.requests_total == 20 and stats.active_connections == 0
    metrics = proxyd.metrics()
    labels = 'code="2xx",deployment="demo",endpoint="http",service="web"'
    assert re.search(r"zlayer_proxy_requests_total\{" + labels + r"\} 20\.0", metrics), metrics
    assert 'zlayer_proxy_request_duration_seconds_count{deployment="demo"' in metrics


def test_an_access_log_nobody_reads_holds_no_request_up_and_loses_none_it_kept(
    proxyd: Proxyd, backends: Backends
) -> None:
    """proxyd's stderr here is a pipe read only when it stops: 2,000 access log lines
    are about five times what the pipe holds. Every request is answered while the
    log waits (its lines queue in proxyd), and at the stop every line is written."""
    proxyd.configure(access_log=True)
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.http(backends.port)], BACKENDS[:2])])
    count = 2000

    async def scenario() -> list[int]:
        async with one_connection() as session:
            statuses = []
            for i in range(count):
                got = await fetch(session, f"{proxyd.base}/n{i}", headers={"Host": "web.test"})
                statuses.append(got[0])
            return statuses

    # A proxyd whose loop waited for the pipe would answer none after the first few
    # hundred: the bound turns that into a failure, not a test that never ends.
    statuses = run(lambda: asyncio.wait_for(scenario(), 120))
    assert statuses == [200] * count
    proxyd.stop()
    logged = re.findall(r'"GET /n(\d+)" 200 ', proxyd.logs)
    assert sorted(map(int, logged)) == list(range(count))


def test_least_connections_prefers_the_idle_backend(proxyd: Proxyd, backends: Backends) -> None:
    proxyd.configure(balancing="least_connections")
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.http(backends.port)], BACKENDS[:2])])

    async def scenario() -> tuple[str, list[str]]:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.create_task(fetch(session, f"{proxyd.base}/slow?sleep=1.5"))
            while sum(backends.hits.values()) < 1:
                await asyncio.sleep(0.01)
            quick = [(await fetch(session, f"{proxyd.base}/quick"))[1].split()[0] for _ in range(6)]
            _, body, _ = await slow
            return body.split()[0], quick

    busy, quick = run(scenario)
    idle = "127.0.0.3" if busy == "127.0.0.2" else "127.0.0.2"
    assert quick == [idle] * 6


def test_a_dropped_backend_gets_no_new_requests_and_finishes_its_own(
    proxyd: Proxyd, backends: Backends
) -> None:
    proxyd.start()
    endpoint = [proxyd.http(backends.port)]
    proxyd.push("demo", [service("web", endpoint, BACKENDS[:2])])

    async def scenario() -> tuple[tuple[int, str, dict[str, str]], list[str]]:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.create_task(fetch(session, f"{proxyd.base}/long?sleep=1.5"))
            while sum(backends.hits.values()) < 1:
                await asyncio.sleep(0.01)
            (busy,) = [a for a, n in backends.hits.items() if n]
            keep = "127.0.0.3" if busy == "127.0.0.2" else "127.0.0.2"
            await asyncio.to_thread(proxyd.push, "demo", [service("web", endpoint, [keep])])
            after = [(await fetch(session, f"{proxyd.base}/x"))[1].split()[0] for _ in range(6)]
            return await slow, [busy, *after]

    (status, body, _), served = run(scenario)
    busy, *after = served
    assert status == 200 and body.startswith(busy)  # the long request finished where it ran
    assert busy not in after and len(set(after)) == 1


def test_retry_on_a_dead_backend_and_the_error_statuses(proxyd: Proxyd, backends: Backends) -> None:
    proxyd.configure(response_header_timeout=1.0, access_log=True)
    proxyd.start()
    backends.stop_address("127.0.0.4")  # nothing listens there any more: refused
    endpoint = [proxyd.http(backends.port, host="app.test")]

    async def get_all(count: int, path: str = "/") -> list[tuple[int, str, dict[str, str]]]:
        async with aiohttp.ClientSession() as session:
            return [
                await fetch(session, f"{proxyd.base}{path}", headers={"Host": "app.test"})
                for _ in range(count)
            ]

    proxyd.push("demo", [service("web", endpoint, ["127.0.0.4", "127.0.0.2"])])
    answers = run(lambda: get_all(4))
    assert [a[0] for a in answers] == [200] * 4
    assert {a[1].split()[0] for a in answers} == {"127.0.0.2"}

    proxyd.push("demo", [service("web", endpoint, ["127.0.0.4"])])
    ((status, body, headers),) = run(lambda: get_all(1))
    assert status == 502 and headers["Content-Type"].startswith("text/plain")
    assert "backend" in body and body.count("\n") == 1

    proxyd.push("demo", [service("web", endpoint, [])])
    ((status, body, _),) = run(lambda: get_all(1))
    assert status == 503 and "no backend" in body

    proxyd.push("demo", [service("web", endpoint, ["127.0.0.2"])])
    started = time.monotonic()
    ((status, body, _),) = run(lambda: get_all(1, "/hang?sleep=5"))
    assert status == 504 and time.monotonic() - started < 4
    assert run(lambda: get_all(1))[0][0] == 200  # and it serves on

    async def unrouted() -> int:
        async with aiohttp.ClientSession() as session:
            return (await fetch(session, proxyd.base, headers={"Host": "other.test"}))[0]

    assert run(unrouted) == 404
    proxyd.stop()
    assert re.search(r'127\.0\.0\.1 app\.test "GET /" 200 \d+ [\d.]+ms 127\.0\.0\.2:', proxyd.logs)
    assert '"GET /hang?sleep=5" 504' in proxyd.logs


def test_routing_by_host_and_longest_path_prefix(proxyd: Proxyd, backends: Backends) -> None:
    proxyd.start()
    port = backends.port
    proxyd.push(
        "demo",
        [
            service("api", [proxyd.http(port, host="api.example.com", path="/v1")], ["127.0.0.2"]),
            service(
                "admin",
                [proxyd.http(port, host="api.example.com", path="/v1/admin")],
                ["127.0.0.3"],
            ),
            service("www", [proxyd.http(port, host="*.example.com")], ["127.0.0.4"]),
        ],
    )
    proxyd.push("other", [service("root", [proxyd.http(port)], ["127.0.0.3"], "other")])

    cases = [
        ("api.example.com", "/v1/users", "127.0.0.2"),
        ("API.example.com:80", "/v1", "127.0.0.2"),
        ("api.example.com", "/v1/admin/x", "127.0.0.3"),
        ("api.example.com", "/v1admin", "127.0.0.4"),  # not a path segment: falls to *.example.com
        ("shop.example.com", "/v1/users", "127.0.0.4"),
        ("example.org", "/anything", "127.0.0.3"),  # the other deployment's catch-all
    ]

    async def scenario() -> list[str]:
        async with aiohttp.ClientSession() as session:
            return [
                (await fetch(session, f"{proxyd.base}{path}", headers={"Host": host}))[1].split()[0]
                for host, path, _ in cases
            ]

    assert run(scenario) == [expected for _, _, expected in cases]


def make_certificate(directory: Path, name: str) -> None:
    """A self-signed certificate for ``name`` as ``<name>.crt`` / ``<name>.key``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def client_tls(alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context that takes any certificate: the tests look at which one came."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def peer_common_name(port: int, server_name: str, alpn: list[str]) -> tuple[str, str | None]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    context = client_tls(alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return str(name), tls.selected_alpn_protocol()


def h2_get(port: int, server_name: str, path: str) -> tuple[int, bytes]:
    """One GET over HTTP/2 with the h2 library on a TLS socket (ALPN h2)."""
    import h2.connection
    import h2.events

    context = client_tls(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "GET"),
                (":path", path),
                (":scheme", "https"),
                (":authority", server_name),
            ],
            end_stream=True,
        )
        tls.sendall(conn.data_to_send())
        status = 0
        body = b""
        ended = False
        while not ended:
            data = tls.recv(65536)
            assert data, "the proxy closed the HTTP/2 connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            tls.sendall(conn.data_to_send())
        return status, body


def test_tls_sni_picks_the_certificate_and_serves_http2_and_http1(
    proxyd: Proxyd, backends: Backends, zlayer_prefix: Paths
) -> None:
    certs = zlayer_prefix.prefix / "certs"
    certs.mkdir()
    make_certificate(certs, "a.test")
    make_certificate(certs, "*.b.test")
    proxyd.configure(tls_cert_dir=str(certs))
    proxyd.start()
    https = proxyd.https(backends.port)
    proxyd.push(
        "demo",
        [
            service("a", [{**https, "host": "a.test"}], ["127.0.0.2"]),
            service("b", [{**https, "host": "*.b.test"}], ["127.0.0.3"]),
            service("plain", [proxyd.http(backends.port, host="other.test")], ["127.0.0.4"]),
        ],
    )
    assert peer_common_name(proxyd.https_port, "a.test", ["http/1.1"]) == ("a.test", "http/1.1")
    assert peer_common_name(proxyd.https_port, "x.b.test", ["h2"]) == ("*.b.test", "h2")

    status, body = h2_get(proxyd.https_port, "x.b.test", "/over/h2?q=1")
    assert status == 200 and body == b"127.0.0.3 GET /over/h2?q=1 0\n"
    assert backends.seen_headers[-1]["X-Forwarded-Proto"] == "https"
    assert h2_get(proxyd.https_port, "nowhere.test", "/")[0] == 404

    async def over_http1() -> tuple[int, str, dict[str, str]]:
        context = client_tls()
        async with aiohttp.ClientSession() as session:
            return await fetch(
                session,
                f"https://127.0.0.1:{proxyd.https_port}/h1",
                headers={"Host": "a.test"},
                server_hostname="a.test",
                ssl=context,
            )

    status, text, _ = run(over_http1)
    assert status == 200 and text == "127.0.0.2 GET /h1 0\n"
    # https routes are not on the plain port
    assert run(lambda: _plain_get(proxyd, "a.test")) == 404


def peer_serial(port: int, server_name: str) -> int:
    from cryptography import x509

    context = client_tls()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)


def test_certificates_reload_on_sighup_and_connections_stay(
    proxyd: Proxyd, backends: Backends, zlayer_prefix: Paths
) -> None:
    certs = zlayer_prefix.prefix / "certs"
    certs.mkdir()
    make_certificate(certs, "a.test")
    proxyd.configure(tls_cert_dir=str(certs))
    proxyd.start()
    https = proxyd.https(backends.port)
    proxyd.push("demo", [service("a", [{**https, "host": "a.test"}], ["127.0.0.2"])])
    old = peer_serial(proxyd.https_port, "a.test")

    # A keep-alive connection made before the reload.
    raw = socket.create_connection(("127.0.0.1", proxyd.https_port), timeout=5)
    try:
        kept = client_tls().wrap_socket(raw, server_hostname="a.test")
    except BaseException:
        raw.close()
        raise
    request = b"GET /kept HTTP/1.1\r\nHost: a.test\r\n\r\n"

    def ask() -> bytes:
        """One request on the kept connection; the whole response (Content-Length framed)."""
        kept.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = kept.recv(65536)
            assert chunk, "the proxy closed the kept connection"
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = kept.recv(65536)
            assert chunk, "the proxy closed the kept connection"
            body += chunk
        return head + b"\r\n\r\n" + body

    try:
        assert ask().startswith(b"HTTP/1.1 200")
        make_certificate(certs, "a.test")  # renewed: a new key and serial
        make_certificate(certs, "c.test")
        assert proxyd.process is not None
        proxyd.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while peer_serial(proxyd.https_port, "a.test") == old:
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            time.sleep(0.1)
        assert peer_common_name(proxyd.https_port, "c.test", ["http/1.1"])[0] == "c.test"
        assert ask().startswith(b"HTTP/1.1 200")  # the old connection goes on
    finally:
        kept.close()

    # Files that cannot be used leave the certificates serving as they were.
    renewed = peer_serial(proxyd.https_port, "a.test")
    (certs / "a.test.key").write_text("not a key\n")
    proxyd.process.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert peer_serial(proxyd.https_port, "a.test") == renewed
    proxyd.stop()
    assert "certificates not reloaded, the old ones still serve" in proxyd.logs
    assert "reloaded 2 certificates (a.test, c.test)" in proxyd.logs


def test_a_reload_before_any_tls_listener_reads_no_certificates(
    proxyd: Proxyd, backends: Backends
) -> None:
    proxyd.start()
    self_signed = proxyd.paths.daemon_state("proxyd") / "tls" / "self-signed.crt"
    assert proxyd.process is not None
    proxyd.process.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert not self_signed.exists()  # nothing serves a certificate yet: none is made
    # The first TLS listener still reads them (here: makes the self-signed one).
    proxyd.push("demo", [service("a", [proxyd.https(backends.port)], ["127.0.0.2"])])
    assert peer_common_name(proxyd.https_port, "x", ["http/1.1"])[0] == "zlayer-proxyd"
    assert self_signed.exists()
    proxyd.stop()
    assert "no TLS listener yet; certificates are read when the first one opens" in proxyd.logs


async def _plain_get(proxyd: Proxyd, host: str) -> int:
    async with aiohttp.ClientSession() as session:
        return (await fetch(session, proxyd.base, headers={"Host": host}))[0]


def test_websocket_passes_through_and_posts_stream(proxyd: Proxyd, backends: Backends) -> None:
    proxyd.start()
    ws = {**proxyd.http(backends.port), "name": "ws", "protocol": "websocket"}
    proxyd.push("demo", [service("chat", [ws], ["127.0.0.2"])])

    async def scenario() -> tuple[str, bytes, int, str]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{proxyd.http_port}/ws") as sock:
                await sock.send_str("hello")
                text = await sock.receive_str(timeout=5)
                await sock.send_bytes(b"abc")
                data = await sock.receive_bytes(timeout=5)

            # A chunked upload (no length) goes through whole.
            async def chunks() -> Any:
                for _ in range(8):
                    yield b"x" * 100_000

            status, body, _ = await fetch(
                session, f"{proxyd.base}/up", method="POST", data=chunks()
            )
            return text, data, status, body

    text, data, status, body = run(scenario)
    assert text == "echo hello" and data == b"cba"
    assert status == 200 and body == "127.0.0.2 POST /up 800000\n"
    assert [s.active_connections for s in proxyd.stats()] == [0]


def test_restart_serves_saved_routes_and_bad_pushes_are_named_errors(
    proxyd: Proxyd, backends: Backends
) -> None:
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.http(backends.port)], ["127.0.0.2"])])

    bad = [
        ("demo", "not json", InvalidArgumentError, "not a DeploymentTraffic"),
        ("demo", json.dumps({"deployment": "else", "services": []}), InvalidArgumentError, "else"),
        (
            "demo",
            json.dumps(
                {
                    "deployment": "demo",
                    "services": [
                        service("web", [{"name": "x", "protocol": "gopher", "port": 1}], [])
                    ],
                }
            ),
            InvalidArgumentError,
            "protocol",
        ),
        (
            "rival",
            json.dumps(
                {
                    "deployment": "rival",
                    "services": [service("w", [proxyd.http(1)], ["127.0.0.3"], "rival")],
                }
            ),
            ConflictError,
            "demo/web",
        ),
    ]
    for deployment, payload, error, words in bad:
        with pytest.raises(error) as caught:
            proxyd.push_text(deployment, payload)
        message = str(caught.value)
        assert words in message and "\n" not in message and "Traceback" not in message

    proxyd.stop()
    proxyd.configure(http_port=80)  # an old file: it still starts, and says the key is unused
    proxyd.start()
    assert [r.service for r in proxyd.routes()] == ["web"]
    assert run(lambda: _plain_get(proxyd, "any.test")) == 200
    # An empty push removes the deployment, also from disk.
    proxyd.push("demo", [])
    assert proxyd.routes() == []
    assert not list((state_dir(proxyd.paths) / "traffic").glob("*.json"))
    proxyd.stop()
    assert "http_port in " in proxyd.logs and "has no effect any more" in proxyd.logs


def refused(address: str, port: int) -> bool:
    """Whether nothing listens on (address, port) now."""
    try:
        socket.create_connection((address, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def closes(address: str, port: int) -> bool:
    """Whether (address, port) stops listening (the supervisor drops the kept socket)."""
    deadline = time.monotonic() + 10
    while not refused(address, port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def _get(url: str, host: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        status, body, _ = await fetch(session, url, headers={"Host": host})
        return status, body


def test_endpoints_listen_on_their_own_ports_shared_and_routed_by_host(
    proxyd: Proxyd, backends: Backends
) -> None:
    proxyd.start()
    shared, other = proxyd.http_port, free_port()
    target = backends.port
    proxyd.push(
        "one",
        [service("web", [http_endpoint(shared, target, host="a.test")], ["127.0.0.2"], "one")],
    )
    proxyd.push(
        "two",
        [
            service("web", [http_endpoint(shared, target, host="b.test")], ["127.0.0.3"], "two"),
            service("api", [http_endpoint(other, target)], ["127.0.0.4"], "two"),
        ],
    )
    base = f"http://127.0.0.1:{shared}"
    assert run(lambda: _get(base, "a.test"))[1].split()[0] == "127.0.0.2"
    assert run(lambda: _get(base, "b.test"))[1].split()[0] == "127.0.0.3"
    assert run(lambda: _get(base, "c.test"))[0] == 404
    assert run(lambda: _get(f"http://127.0.0.1:{other}/x", "any.test"))[1].split()[0] == "127.0.0.4"
    listens = {(r.deployment, r.service): r.listen for r in proxyd.routes()}
    assert listens == {
        ("one", "web"): f"127.0.0.1:{shared}",
        ("two", "web"): f"127.0.0.1:{shared}",
        ("two", "api"): f"127.0.0.1:{other}",
    }

    # An https endpoint on a plain port is refused; so is a port another program holds.
    https = {**http_endpoint(shared, target, host="d.test"), "protocol": "https"}
    with pytest.raises(ConflictError, match="a port is plain or TLS"):
        proxyd.push("three", [service("web", [https], ["127.0.0.2"], "three")])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(ConflictError) as caught:
            proxyd.push(
                "three", [service("web", [http_endpoint(taken, target)], ["127.0.0.2"], "three")]
            )
    message = str(caught.value)
    assert message == (
        f"cannot listen on 127.0.0.1:{taken} for three/web endpoint http: another program is "
        "listening there; stop it or give the endpoint another port"
    )
    assert [r.deployment for r in proxyd.routes()].count("three") == 0
    assert run(lambda: _get(base, "a.test"))[0] == 200  # the others serve on

    # A port turns from plain to TLS in one push: the same socket serves on.
    api_tls = {**http_endpoint(other, target), "protocol": "https"}
    web = service("web", [http_endpoint(shared, target, host="b.test")], ["127.0.0.3"], "two")
    proxyd.push("two", [web, service("api", [api_tls], ["127.0.0.4"], "two")])

    async def over_tls() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            url = f"https://127.0.0.1:{other}/tls"
            status, body, _ = await fetch(session, url, ssl=client_tls())
            return status, body

    assert run(over_tls) == (200, "127.0.0.4 GET /tls 0\n")
    proxyd.push("two", [web, service("api", [http_endpoint(other, target)], ["127.0.0.4"], "two")])
    assert run(lambda: _get(f"http://127.0.0.1:{other}/x", "any.test"))[1].split()[0] == "127.0.0.4"

    # Each listening socket is kept by the supervisor, and dropped with its port:
    # two's api goes, then one's and two's web.
    kept = {f"proxyd-127.0.0.1-{shared}", f"proxyd-127.0.0.1-{other}"}
    assert set(proxyd.notify.names()) == kept
    proxyd.push(
        "two",
        [service("web", [http_endpoint(shared, target, host="b.test")], ["127.0.0.3"], "two")],
    )
    assert closes("127.0.0.1", other)
    proxyd.push("two", [])
    assert run(lambda: _get(base, "a.test"))[0] == 200
    proxyd.push("one", [])
    assert closes("127.0.0.1", shared)
    assert proxyd.routes() == [] and proxyd.notify.names() == []


class RequestLoop:
    """One request after another, each on a new connection, counting how each ended."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import http.client

        while self.running:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", "/loop")
                response = conn.getresponse()
                response.read()
                outcome = "ok" if response.status == 200 else f"status {response.status}"
            except ConnectionRefusedError:
                outcome = "refused"
            except (OSError, http.client.HTTPException) as exc:
                outcome = "failed"
                self.errors.append(repr(exc))
            finally:
                conn.close()
            self.outcomes[outcome] += 1

    def served(self) -> int:
        return self.outcomes["ok"]

    def wait_served(self, more: int) -> None:
        """Until ``more`` further requests have been answered."""
        target = self.served() + more
        deadline = time.monotonic() + 30
        while self.served() < target:
            assert time.monotonic() < deadline, f"the loop stalled: {self.outcomes}"
            time.sleep(0.02)

    def stop(self) -> Counter[str]:
        self.running = False
        self.thread.join(60)
        return self.outcomes


def test_kill_9_refuses_no_connection_the_next_process_takes_the_kept_socket(
    proxyd: Proxyd, backends: Backends
) -> None:
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.http(backends.port)], BACKENDS[:2])])
    loop = RequestLoop(proxyd.http_port)
    try:
        loop.wait_served(20)
        assert proxyd.process is not None
        proxyd.process.kill()
        _, err = proxyd.process.communicate(timeout=10)
        proxyd.logs += err
        proxyd.process = None
        proxyd.start()  # as the supervisor restarts it, with the kept sockets
        loop.wait_served(50)
    finally:
        outcomes = loop.stop()
    # Connections made while no process ran waited in the kept socket's queue.
    # Only a request the killed process had in hand at that instant may fail.
    assert outcomes["refused"] == 0, outcomes
    assert outcomes["failed"] <= 1, (outcomes, loop.errors)
    assert set(outcomes) <= {"ok", "failed"}, outcomes
    assert proxyd.notify.names() == [f"proxyd-127.0.0.1-{proxyd.http_port}"]


def test_a_graceful_restart_finishes_what_it_has_and_fails_nothing(
    proxyd: Proxyd, backends: Backends
) -> None:
    proxyd.start()
    proxyd.push("demo", [service("web", [proxyd.http(backends.port)], BACKENDS[:2])])

    async def slow() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            status, body, _ = await fetch(session, f"{proxyd.base}/slow?sleep=1.5")
            return status, body

    loop = RequestLoop(proxyd.http_port)
    slow_thread = LoopThread()
    try:
        loop.wait_served(20)
        in_flight = asyncio.run_coroutine_threadsafe(slow(), slow_thread.loop)
        while "/slow?sleep=1.5" not in backends.paths:
            time.sleep(0.01)
        proxyd.stop()  # SIGTERM: stop accepting, finish in-flight requests, exit 0
        proxyd.start()
        loop.wait_served(50)
        status, body = in_flight.result(30)
    finally:
        outcomes = loop.stop()
        slow_thread.close()
    assert status == 200 and "/slow?sleep=1.5" in body
    assert outcomes == Counter(ok=outcomes["ok"]), (outcomes, loop.errors)


@pytest.mark.skipif(os.geteuid() != 0, reason="overlayd's bridge needs root")
def test_internal_endpoints_listen_on_the_node_address_only(
    proxyd: Proxyd, backends: Backends, zlayer_prefix: Paths, private_bus: PrivateBus
) -> None:
    # The real overlayd of this prefix (its own bridge and subnet) says the node address.
    overlay_notify = NotifyListener(zlayer_prefix.prefix / "overlayd-notify.sock")
    overlayd = start("overlayd", private_bus, overlay_notify)
    try:
        overlay_notify.wait_for("READY=1", timeout=30)
        gateway = proxyd.network().gateway
        proxyd.start()
        inner, mixed = proxyd.http_port, free_port()
        internal = {**http_endpoint(inner, backends.port), "expose": "internal"}
        proxyd.push(
            "demo",
            [
                service("api", [internal], ["127.0.0.2"]),
                service(
                    "admin", [{**internal, "port": mixed, "host": "admin.test"}], ["127.0.0.3"]
                ),
                service("www", [http_endpoint(mixed, backends.port)], ["127.0.0.4"]),
            ],
        )
        # Internal: the node address serves it, 127.0.0.1 (a listen address) does not.
        assert refused("127.0.0.1", inner)
        assert run(lambda: _get(f"http://{gateway}:{inner}/i", "any"))[1].split()[0] == "127.0.0.2"
        # A port with both: public routes everywhere, internal ones on the node address only.
        assert run(lambda: _get(f"http://127.0.0.1:{mixed}/", "admin.test"))[1].startswith(
            "127.0.0.4"
        )
        assert run(lambda: _get(f"http://{gateway}:{mixed}/", "admin.test"))[1].startswith(
            "127.0.0.3"
        )
        assert run(lambda: _get(f"http://{gateway}:{mixed}/", "www.test"))[1].startswith(
            "127.0.0.4"
        )
        listens = {r.service: r.listen for r in proxyd.routes()}
        assert listens == {
            "api": f"{gateway}:{inner}",
            "admin": f"{gateway}:{mixed}",
            "www": f"127.0.0.1:{mixed}",
        }
        # A second internal endpoint on the same spot is only shadowed: the push is not refused.
        proxyd.push("other", [service("api", [internal], ["127.0.0.3"], "other")])
        assert run(lambda: _get(f"http://{gateway}:{inner}/i", "any"))[1].split()[0] == "127.0.0.2"
        proxyd.push("demo", [])
        proxyd.push("other", [])
        assert closes(gateway, inner) and closes("127.0.0.1", mixed)
    finally:
        code, err = stop(overlayd)
        overlay_notify.close()
    assert code == 0 and "Traceback" not in err, err
    proxyd.stop()
    assert "other/api endpoint http routes host * path /" in proxyd.logs
