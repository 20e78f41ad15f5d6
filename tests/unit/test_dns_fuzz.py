"""The service DNS server under hostile traffic, over real sockets on 127.0.0.1.

Forwarded queries are bounded (``max_in_flight``, then dropped and counted),
TCP connections are bounded, and no datagram (random bytes, truncated or
malformed queries, compression loops, huge counts) crashes the server, hangs
it or leaves tasks behind. The upstream is a socket that never answers, so a
forwarded query holds its slot for the whole upstream timeout.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from daemons.overlayd.dns import DnsServer, Upstream, Zone
from daemons.overlayd.settings import OverlaySettings
from shared.config import ConfigError
from shared.paths import Paths
from shared.wire.traffic import Backend, DeploymentTraffic, ServiceTraffic

MAX_IN_FLIGHT = 8
MAX_TCP = 4


class Running:
    """A DnsServer on its own event loop in a thread, with a silent upstream."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.silent.bind(("127.0.0.1", 0))
        zone = Zone()
        backend = Backend(replica="web-1", instance=1, revision=1, address="10.9.0.2")
        zone.set(
            DeploymentTraffic(
                deployment="shop",
                services=[ServiceTraffic(deployment="shop", service="web", backends=[backend])],
            )
        )
        upstream = Upstream("127.0.0.1", self.silent.getsockname()[1])
        self.server = DnsServer(
            zone, [upstream], max_in_flight=MAX_IN_FLIGHT, max_tcp_connections=MAX_TCP
        )
        self.run(lambda: self.server.start("127.0.0.1", 0))
        assert self.server._udp is not None and self.server._tcp is not None
        self.udp_port = self.server._udp.get_extra_info("sockname")[1]
        self.tcp_port = self.server._tcp.sockets[0].getsockname()[1]

    def run(self, make: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return await make()

        future: Future[Any] = asyncio.run_coroutine_threadsafe(call(), self.loop)
        return future.result(timeout=30)

    def tasks(self) -> int:
        async def count() -> int:
            return len(self.server._tasks)

        return int(self.run(count))

    def ask_local(self) -> DNSRecord:
        """A service name: answered at once, however busy the forwarder is."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(
                DNSRecord.question("web.service.local").pack(), ("127.0.0.1", self.udp_port)
            )
            return DNSRecord.parse(sock.recv(4096))

    def close(self) -> None:
        self.run(self.server.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        self.silent.close()


@contextmanager
def running() -> Iterator[Running]:
    server = Running()
    try:
        yield server
    finally:
        server.close()


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value("zlayer_overlay_dns_dropped_total", {"reason": reason})
    return value or 0.0


def wait_for(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# ---------------------------------------------------------------- the bounds


def test_forwarded_queries_past_the_limit_are_dropped_and_counted() -> None:
    with running() as server:
        before = dropped("busy")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            for i in range(50):
                query = DNSRecord.question(f"host{i}.example.org")
                client.sendto(query.pack(), ("127.0.0.1", server.udp_port))
            # Only MAX_IN_FLIGHT wait on the upstream; the rest were dropped at once.
            assert wait_for(lambda: dropped("busy") - before == 50 - MAX_IN_FLIGHT)
            assert server.server.in_flight == MAX_IN_FLIGHT
            assert server.tasks() == MAX_IN_FLIGHT
            # Service names are still answered while the forwarder is full.
            local = server.ask_local()
            assert local.header.rcode == RCODE.NOERROR and str(local.rr[0].rdata) == "10.9.0.2"
            # The held ones end in SERVFAIL when the upstream times out, and free their slots.
            answers = [DNSRecord.parse(client.recv(4096)) for _ in range(MAX_IN_FLIGHT)]
        assert {a.header.rcode for a in answers} == {RCODE.SERVFAIL}
        assert wait_for(lambda: server.tasks() == 0)
        assert server.server.in_flight == 0
        assert not server.errors


def test_tcp_connections_past_the_limit_are_closed_and_counted() -> None:
    with running() as server:
        before = dropped("tcp_connections")
        held = [socket.create_connection(("127.0.0.1", server.tcp_port)) for _ in range(MAX_TCP)]
        try:
            assert wait_for(lambda: server.tasks() == MAX_TCP)
            extra = socket.create_connection(("127.0.0.1", server.tcp_port), timeout=5)
            with extra:
                assert extra.recv(10) == b""  # closed without an answer
            assert dropped("tcp_connections") - before == 1
            # The held ones still serve.
            query = DNSRecord.question("web.service.local").pack()
            held[0].sendall(struct.pack("!H", len(query)) + query)
            held[0].settimeout(5)
            (length,) = struct.unpack("!H", held[0].recv(2))
            assert DNSRecord.parse(held[0].recv(length)).rr
        finally:
            for conn in held:
                conn.close()
        assert wait_for(lambda: server.tasks() == 0)
        assert not server.errors


def test_the_bounds_are_settings(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    config = paths.daemon_config("overlayd")
    config.write_text("")
    loaded = OverlaySettings.load("overlayd", paths)
    assert (loaded.dns_max_in_flight, loaded.dns_max_tcp_connections) == (256, 64)
    config.write_text("dns_max_in_flight = 1000\ndns_max_tcp_connections = 8\n")
    loaded = OverlaySettings.load("overlayd", paths)
    assert (loaded.dns_max_in_flight, loaded.dns_max_tcp_connections) == (1000, 8)
    config.write_text("dns_max_in_flight = 0\n")
    with pytest.raises(ConfigError, match="dns_max_in_flight"):
        OverlaySettings.load("overlayd", paths)


# ---------------------------------------------------------------- hostile datagrams


def header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, ns, ar)


def question(name: str, qtype: str) -> bytes:
    """A query with a fixed id (DNSRecord.question draws one from ``random``)."""
    query = DNSRecord(DNSHeader(id=0x1234, rd=1), q=DNSQuestion(name, QTYPE.reverse[qtype]))
    return bytes(query.pack())


COUNTS = st.integers(min_value=0, max_value=65535)
NAMES = st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=8).map(
    lambda labels: b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
)
QUESTION_TAIL = st.binary(min_size=0, max_size=4)

HOSTILE = st.one_of(
    # Random bytes.
    st.binary(max_size=600),
    # A real query, cut anywhere.
    st.tuples(
        st.sampled_from(["web.service.local", "example.org", "x.shop.service.local"]),
        st.sampled_from(["A", "AAAA", "ANY", "SOA", "TXT"]),
        st.integers(min_value=0, max_value=60),
    ).map(lambda t: question(t[0], t[1])[: t[2]]),
    # Counts far beyond what the packet holds.
    st.tuples(COUNTS, COUNTS, COUNTS, COUNTS, NAMES, QUESTION_TAIL).map(
        lambda t: header(t[0], t[1], t[2], t[3]) + t[4] + t[5]
    ),
    # Compression pointers: to itself, forward, in a loop, past the end.
    st.sampled_from(
        [
            header() + b"\xc0\x0c" + b"\x00\x01\x00\x01",
            header() + b"\xc0\x0e\xc0\x0c" + b"\x00\x01\x00\x01",
            header() + b"\x01a\xc0\x0c" + b"\x00\x01\x00\x01",
            header() + b"\xc0\xff" + b"\x00\x01\x00\x01",
            header(qd=2) + b"\x01a\x00\x00\x01\x00\x01" + b"\xc0\x19\x00\x01\x00\x01",
            header(an=1) + b"\x00\x00\x01\x00\x01" + b"\xc0\x11" + b"\x00" * 10,
        ]
    ),
    # Odd labels and flags: non-ASCII, too long names, responses, other opcodes.
    st.tuples(NAMES, st.integers(min_value=0, max_value=0xFFFF), QUESTION_TAIL).map(
        lambda t: header(flags=t[1]) + t[0] + b"\x00\x01\x00\x01" + t[2]
    ),
    # EDNS0 with any payload size.
    st.integers(min_value=0, max_value=65535).map(
        lambda size: (
            header(ar=1)
            + b"\x03web\x07service\x05local\x00\x00\x01\x00\x01"
            + b"\x00\x00\x29"
            + struct.pack("!H", size)
            + b"\x00\x00\x00\x00\x00\x00"
        )
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets=st.lists(HOSTILE, min_size=1, max_size=20))
def test_hostile_datagrams_never_crash_hang_or_pile_up(packets: list[bytes]) -> None:
    server = SERVER
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for packet in packets:
            client.sendto(packet, ("127.0.0.1", server.udp_port))
    # Still answering, at once, and never more tasks than the bound.
    assert server.ask_local().header.rcode == RCODE.NOERROR
    assert server.tasks() <= MAX_IN_FLIGHT
    assert server.server.in_flight <= MAX_IN_FLIGHT
    assert not server.errors, server.errors[:3]


@settings(max_examples=100, deadline=None)
@given(
    stream=st.lists(
        st.one_of(
            HOSTILE.map(lambda p: struct.pack("!H", len(p)) + p),
            st.binary(max_size=40),  # lengths that promise more than comes
        ),
        min_size=1,
        max_size=5,
    )
)
def test_hostile_tcp_streams_never_crash_or_hang(stream: list[bytes]) -> None:
    server = SERVER
    with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=5) as conn:
        for chunk in stream:
            try:
                conn.sendall(chunk)
            except OSError:
                break  # the server closed it: fine
    assert server.ask_local().header.rcode == RCODE.NOERROR
    assert server.tasks() <= MAX_IN_FLIGHT + MAX_TCP
    assert not server.errors, server.errors[:3]


SERVER: Running


def setup_module() -> None:
    global SERVER
    SERVER = Running()


def teardown_module() -> None:
    SERVER.close()
