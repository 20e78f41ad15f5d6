"""Service DNS: the names under ``service.local`` and a forwarder for every other name.

Every replica's resolv.conf names the node bridge's gateway address, where
overlayd answers on UDP and TCP (port ``dns_port``):

- ``{service}.service.local``: every in-rotation replica of that service,
  of every deployment that has a service of that name;
  ``{service}.{deployment}.service.local``: one deployment's;
- ``{service}-{instance}.{service}.service.local`` and
  ``{instance}.{service}.service.local``: one replica (during a rollout two
  revisions share an instance number, so both answer); the same under
  ``{service}.{deployment}.service.local``;
- any other name under ``service.local`` is NXDOMAIN; a known name asked
  for another type than A (AAAA...) is NOERROR with no answers;
- everything else goes to the host's resolvers over UDP (TCP when the
  answer is truncated), and SERVFAIL when none answers in time.

:class:`Zone` holds the names, rebuilt from the pushed
:class:`~shared.traffic.DeploymentTraffic`; :class:`DnsServer` serves them
with asyncio. dnslib only parses and builds packets.

Its two sockets outlive overlayd: they are kept in the supervisor's file
descriptor store (systemd's, or ``zlayerctl daemon run``'s) as ``dns-udp``
and ``dns-tcp`` and taken back at the next start (:mod:`shared.notify`), so
while overlayd restarts, queries wait in the kernel's queues instead of
being refused, and the next process answers them. A graceful stop answers
the queries it has already read before it closes (:meth:`DnsServer.stop`).

Bounds, since any replica (or anything on the bridge) can send datagrams
as fast as it likes: names under ``service.local`` and malformed packets
are answered at once, with no task and no socket. A forwarded query holds
a task and one upstream socket (a fresh one per query, so its source port
is random, which a blind spoofer has to guess) until the upstream answers
or ``UPSTREAM_TIMEOUT`` passes, and at most ``max_in_flight`` are held at
once. A query that would go past that is dropped (no answer, as a
congested resolver does: the client asks again after its own timeout,
where SERVFAIL would make it give up on the name), and so is a TCP
connection past ``max_tcp_connections``; both are counted in
``zlayer_overlay_dns_dropped_total{reason}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from dnslib import QTYPE, RCODE, RR, SOA, A, DNSError, DNSHeader, DNSRecord
from prometheus_client import Counter, Gauge

from shared import notify
from shared.wire.traffic import DeploymentTraffic, DnsRecord

log = logging.getLogger("zlayer.overlayd")

DOMAIN = "service.local"
TTL = 5  # seconds: records follow health, so resolvers must not hold them long
UPSTREAM_TIMEOUT = 2.0  # per upstream and attempt
TCP_IDLE_TIMEOUT = 10.0
UDP_PAYLOAD = 512  # without EDNS0
UDP_SOCKET = "dns-udp"  # names in the file descriptor store
TCP_SOCKET = "dns-tcp"
STOP_GRACE = 2 * UPSTREAM_TIMEOUT  # for queries already read when overlayd stops
MAX_IN_FLIGHT = 256  # forwarded queries at once (overlayd.toml: dns_max_in_flight)
MAX_TCP_CONNECTIONS = 64  # (overlayd.toml: dns_max_tcp_connections)

QUERIES = Counter(
    "zlayer_overlay_dns_queries",
    "Service DNS queries by result: answer, nodata, nxdomain, forwarded, servfail, bad.",
    ["result"],
)
DROPPED = Counter(
    "zlayer_overlay_dns_dropped",
    "Service DNS queries and connections dropped unanswered, by reason: "
    "busy (max_in_flight forwarded queries already waiting), tcp_connections.",
    ["reason"],
)
IN_FLIGHT = Gauge("zlayer_overlay_dns_in_flight", "Forwarded service DNS queries waiting.")


@dataclass(frozen=True)
class Upstream:
    """A resolver other names are forwarded to."""

    host: str
    port: int = 53

    def __str__(self) -> str:
        """The form :func:`parse_upstream` reads: the port only when it is not 53."""
        if self.port == 53:
            return self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """``1.2.3.4``, ``1.2.3.4:5353``, ``::1`` or ``[::1]:5353``; ValueError otherwise."""
    text = text.strip()
    port = 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not an address or address:port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host = text
    if not 0 < port < 65536:
        raise ValueError(f"the port of {text!r} is not between 1 and 65535")
    return Upstream(str(ip_address(host)), port)


# ---------------------------------------------------------------- the zone


class Zone:
    """The names under ``service.local`` and their addresses, per deployment."""

    def __init__(self) -> None:
        self._traffic: dict[str, DeploymentTraffic] = {}
        self._records: list[DnsRecord] = []
        self._names: dict[str, list[str]] = {}

    def set(self, traffic: DeploymentTraffic) -> None:
        """Replace one deployment's names (none if it has no services)."""
        if traffic.services:
            self._traffic[traffic.deployment] = traffic
        else:
            self._traffic.pop(traffic.deployment, None)
        self._rebuild()

    def remove_all(self) -> None:
        self._traffic.clear()
        self._rebuild()

    def lookup(self, name: str) -> list[str] | None:
        """The addresses of a name (lowercase, no trailing dot); None if it is unknown."""
        return self._names.get(name)

    def records(self) -> list[DnsRecord]:
        """Every name, sorted by name then deployment."""
        return list(self._records)

    def _rebuild(self) -> None:
        by_key: dict[tuple[str, str, str], list[str]] = {}

        def add(name: str, deployment: str, service: str, addresses: Iterable[str]) -> None:
            held = by_key.setdefault((name, deployment, service), [])
            held += [a for a in addresses if a not in held]

        for deployment, traffic in self._traffic.items():
            for service in traffic.services:
                name = service.service
                everyone = [b.address for b in service.backends]
                for suffix in (DOMAIN, f"{deployment}.{DOMAIN}"):
                    add(f"{name}.{suffix}", deployment, name, everyone)
                    for backend in service.backends:
                        for replica in (f"{name}-{backend.instance}", str(backend.instance)):
                            add(f"{replica}.{name}.{suffix}", deployment, name, [backend.address])
        self._records = [
            DnsRecord(name=name, addresses=addresses, deployment=deployment, service=service)
            for (name, deployment, service), addresses in sorted(by_key.items())
        ]
        names: dict[str, list[str]] = {}
        for record in self._records:
            held = names.setdefault(record.name, [])
            held += [a for a in record.addresses if a not in held]
        self._names = names


# ---------------------------------------------------------------- the server


class DnsServer:
    """Answers service names from a :class:`Zone` and forwards the rest, over UDP and TCP."""

    def __init__(
        self,
        zone: Zone,
        upstreams: list[Upstream],
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_tcp_connections: int = MAX_TCP_CONNECTIONS,
    ) -> None:
        self.zone = zone
        self.upstreams = upstreams
        self.max_in_flight = max_in_flight
        self.max_tcp_connections = max_tcp_connections
        self.in_flight = 0  # forwarded queries waiting for an upstream
        self._tcp_connections = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._reply: socket.socket | None = None  # UDP answers go out here, even while stopping
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # TCP connections waiting for their next query, after answering at least one
        # (a client must expect those to close, RFC 7766); a new connection's first
        # query is waited for when stopping, as it is already on its way.
        self._idle: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (the kept sockets if passed); OSError if the port is taken."""
        loop = asyncio.get_running_loop()
        udp = notify.listening_socket(UDP_SOCKET, socket.SOCK_DGRAM, host, port)
        # A second descriptor of the same socket: the transport's close stops
        # reading, and the answers to what was read still go out through this.
        self._reply = udp.dup()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp)
        self._udp = transport
        try:
            tcp = notify.listening_socket(TCP_SOCKET, socket.SOCK_STREAM, host, port)
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)
        except OSError:
            transport.close()
            self._reply.close()
            raise

    async def stop(self) -> None:
        """Read no more queries, answer those already read (up to STOP_GRACE), close.

        What is not read yet stays queued in the sockets, which the supervisor
        keeps: the next overlayd answers it.
        """
        self._stopping = True
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._idle):
            task.cancel()
        busy = self._tasks - self._idle
        if busy:
            await asyncio.wait(busy, timeout=STOP_GRACE)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._reply is not None:
            self._reply.close()

    # ------------------------------------------------------------ transports

    def _datagram(self, data: bytes, addr: Any) -> None:
        """Answer a datagram now, or forward it in a task of its own (if a slot is free)."""
        answer = self._answer_now(data, tcp=False)
        if not isinstance(answer, _Forward):
            self._send(answer, addr)
            return
        if not self._take_slot():
            return
        task = asyncio.create_task(self._forward_udp(answer, data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_udp(self, forward: _Forward, data: bytes, addr: Any) -> None:
        try:
            reply = await self._forward(forward.query, data, False, forward.limit)
        except Exception:
            log.debug("dropped a query that could not be forwarded", exc_info=True)
            return
        finally:
            self._free_slot()
        self._send(reply, addr)

    def _send(self, reply: bytes | None, addr: Any) -> None:
        if reply is not None and self._reply is not None and self._reply.fileno() >= 0:
            with contextlib.suppress(OSError):  # a full send buffer drops it, as UDP may
                self._reply.sendto(reply, addr)

    def _take_slot(self) -> bool:
        if self.in_flight >= self.max_in_flight:
            DROPPED.labels(reason="busy").inc()
            return False
        self.in_flight += 1
        IN_FLIGHT.inc()
        return True

    def _free_slot(self) -> None:
        self.in_flight -= 1
        IN_FLIGHT.dec()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_connections >= self.max_tcp_connections:
            DROPPED.labels(reason="tcp_connections").inc()
            writer.close()
            return
        self._tcp_connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        answered = 0
        try:
            while not (answered and self._stopping):
                if task is not None and answered:
                    self._idle.add(task)
                try:
                    header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                finally:
                    if task is not None:
                        self._idle.discard(task)
                (length,) = struct.unpack("!H", header)
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                reply = await self.resolve(data, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            self._tcp_connections -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    # ------------------------------------------------------------ answers

    async def resolve(self, data: bytes, tcp: bool) -> bytes | None:
        """The reply to one query packet; None to drop it (not even a header to answer,
        or ``max_in_flight`` forwarded queries are already waiting)."""
        answer = self._answer_now(data, tcp)
        if not isinstance(answer, _Forward):
            return answer
        if not self._take_slot():
            return None
        try:
            return await self._forward(answer.query, data, tcp, answer.limit)
        finally:
            self._free_slot()

    def _answer_now(self, data: bytes, tcp: bool) -> bytes | _Forward | None:
        """The reply when no upstream is needed (local names, malformed packets);
        else what to forward; None to drop the packet."""
        try:
            return self._answer_or_forward(data, tcp)
        except Exception:
            # Raised out of a datagram callback, it would close the transport:
            # one odd packet must not stop the service for everyone.
            log.debug("dropped a query that could not be answered", exc_info=True)
            QUERIES.labels(result="bad").inc()
            return None

    def _answer_or_forward(self, data: bytes, tcp: bool) -> bytes | _Forward | None:
        try:
            query = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError):
            QUERIES.labels(result="bad").inc()
            if len(data) < 12:
                return None
            header = DNSHeader(id=int.from_bytes(data[:2], "big"), qr=1, rcode=RCODE.FORMERR)
            return bytes(DNSRecord(header).pack())
        if query.header.qr or query.header.opcode != 0 or len(query.questions) != 1:
            QUERIES.labels(result="bad").inc()
            reply = query.reply()
            reply.header.rcode = RCODE.NOTIMP if query.header.opcode != 0 else RCODE.FORMERR
            return bytes(reply.pack())
        question = query.q
        name = str(question.qname).rstrip(".").lower()
        limit = _udp_limit(query) if not tcp else 65535
        if name == DOMAIN or name.endswith("." + DOMAIN):
            return _fit(self._local(query, name), limit)
        if not self.upstreams:
            return self._servfail(query)
        return _Forward(query, limit)

    def _local(self, query: DNSRecord, name: str) -> DNSRecord:
        reply = query.reply(ra=1, aa=1)
        qtype = query.q.qtype
        addresses = [] if name == DOMAIN else self.zone.lookup(name)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(_soa())
            QUERIES.labels(result="nxdomain").inc()
            return reply
        if qtype in (QTYPE.A, QTYPE.ANY) and addresses:
            for address in addresses:
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=TTL))
            QUERIES.labels(result="answer").inc()
            return reply
        if name == DOMAIN and qtype in (QTYPE.SOA, QTYPE.ANY):
            reply.add_answer(_soa())
            QUERIES.labels(result="answer").inc()
            return reply
        reply.add_auth(_soa())
        QUERIES.labels(result="nodata").inc()
        return reply

    async def _forward(self, query: DNSRecord, data: bytes, tcp: bool, limit: int) -> bytes:
        # A fresh id per upstream query: an answer must match it (and the
        # question) to be taken, which a blind spoofer has to guess.
        for upstream in self.upstreams:
            upstream_id = secrets.randbelow(65536)
            packet = upstream_id.to_bytes(2, "big") + data[2:]
            try:
                if tcp:
                    answer = await _ask_tcp(upstream, packet)
                else:
                    answer = await _ask_udp(upstream, packet)
                    if _truncated(answer):
                        answer = await _ask_tcp(upstream, packet)
                parsed = DNSRecord.parse(answer)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.debug("the resolver %s did not answer (%s)", upstream, exc)
                continue
            except (DNSError, struct.error, IndexError, ValueError):
                log.debug("the resolver %s sent a packet that is not DNS", upstream)
                continue
            if parsed.header.id != upstream_id or parsed.questions != query.questions:
                log.debug("the resolver %s answered another question", upstream)
                continue
            QUERIES.labels(result="forwarded").inc()
            answer = data[:2] + answer[2:]
            if len(answer) > limit:
                return _truncated_reply(query)
            return answer
        return self._servfail(query)

    def _servfail(self, query: DNSRecord) -> bytes:
        QUERIES.labels(result="servfail").inc()
        reply = query.reply(ra=1, aa=0)
        reply.header.rcode = RCODE.SERVFAIL
        return bytes(reply.pack())


@dataclass(frozen=True)
class _Forward:
    """A query for a name outside ``service.local``, to ask the upstreams."""

    query: DNSRecord
    limit: int  # the reply size the client takes


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._datagram(data, addr)


def _soa() -> RR:
    return RR(
        DOMAIN,
        QTYPE.SOA,
        ttl=TTL,
        rdata=SOA(f"ns.{DOMAIN}", f"hostmaster.{DOMAIN}", (1, 60, 10, 3600, TTL)),
    )


def _udp_limit(query: DNSRecord) -> int:
    """The reply size a UDP client takes: 512, or its EDNS0 payload size."""
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT:
            return max(UDP_PAYLOAD, min(int(rr.rclass), 4096))
    return UDP_PAYLOAD


def _truncated_reply(query: DNSRecord) -> bytes:
    reply = query.reply(ra=1, aa=0)
    reply.header.tc = 1
    return bytes(reply.pack())


def _fit(reply: DNSRecord, limit: int) -> bytes:
    packed: bytes = reply.pack()
    if len(packed) <= limit:
        return packed
    # Keep as many answers as fit and say the rest was cut: the client asks over TCP.
    answers = list(reply.rr)
    while answers and len(packed) > limit:
        answers.pop()
        reply.rr = answers
        reply.auth = []
        reply.header.tc = 1
        packed = reply.pack()
    return packed


def _truncated(answer: bytes) -> bool:
    return len(answer) >= 3 and bool(answer[2] & 0x02)


async def _ask_udp(upstream: Upstream, packet: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _UpstreamProtocol, remote_addr=(upstream.host, upstream.port)
    )
    try:
        transport.sendto(packet)
        return await asyncio.wait_for(protocol.answer, UPSTREAM_TIMEOUT)
    finally:
        transport.close()


async def _ask_tcp(upstream: Upstream, packet: bytes) -> bytes:
    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.wait_for(exchange(), UPSTREAM_TIMEOUT)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)
