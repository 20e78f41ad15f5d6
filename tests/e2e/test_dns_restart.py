"""overlayd's service DNS across restarts of overlayd under ``zlayerctl daemon run``.

overlayd keeps its DNS sockets in the supervisor's file descriptor store: while
it is down and restarting, queries wait in the sockets' queues (UDP) and
backlog (TCP) and the next process answers them. A client asks for a
deployed service's name in a loop, over UDP and TCP in turn, while overlayd is
stopped gracefully (SIGTERM; the supervisor starts it again), then killed with
SIGKILL: none is refused, and every query is answered with the replica's
address except, at most, the one the killed process had already read (a
resolver asks again for that one). The graceful stop loses none.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest
from dnslib import QTYPE, DNSRecord

from daemons.overlayd.settings import OverlaySettings
from tests.e2e.node import Node, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root")

SPEC = """
version: v1
deployment: resolver
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sleep", "3600"]
    scale: {mode: fixed, replicas: 1}
"""
NAME = "web.service.local"
ANSWER_TIMEOUT = 30.0  # a query waits in the kernel's queue until overlayd is back


def ask(server: str, tcp: bool) -> set[str]:
    """The A records of NAME, asked as a stub resolver asks (a connected socket).

    ConnectionRefusedError when nothing listens: over UDP the ICMP port
    unreachable reaches a connected socket as exactly that.
    """
    query = DNSRecord.question(NAME, "A")
    packet = bytes(query.pack())
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.connect((server, 53))
        if tcp:
            sock.sendall(struct.pack("!H", len(packet)) + packet)
            with sock.makefile("rb") as stream:
                (length,) = struct.unpack("!H", stream.read(2))
                data = stream.read(length)
        else:
            sock.send(packet)
            data = sock.recv(4096)
    reply = DNSRecord.parse(data)
    assert reply.header.id == query.header.id
    return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}


@dataclass
class QueryLoop:
    server: str
    answers: list[tuple[bool, frozenset[str]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (when asked, what)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        tcp = False
        while not self.stopping.is_set():
            tcp = not tcp
            asked = time.monotonic()
            try:
                self.answers.append((tcp, frozenset(ask(self.server, tcp))))
            except ConnectionRefusedError:
                self.refused.append("tcp" if tcp else "udp")
            except Exception as exc:  # every failure is an outcome here
                self.errors.append((asked, f"{'tcp' if tcp else 'udp'}: {exc!r}"))


def test_service_dns_answers_across_a_kill_of_overlayd(restarted_node: Node) -> None:
    node = restarted_node
    spec = node.spec("resolver", SPEC)
    node.ctl("up", "-d", str(spec), "--timeout", "90", check=True)
    address = node.replicas("resolver")[0]["address"]
    subnet = OverlaySettings.load("overlayd", node.paths).subnet
    gateway = str(subnet.network_address + 1)
    wait_until(lambda: ask(gateway, tcp=False) == {address}, 30, f"{NAME} to answer {address}")

    loop = QueryLoop(gateway)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    killed_at = 0.0
    try:
        wait_until(lambda: len(loop.answers) >= 4, 20, "answers before the restarts")
        for signum in (signal.SIGTERM, signal.SIGKILL):
            old_pid = node.daemon_pid("overlayd")
            if signum == signal.SIGKILL:
                killed_at = time.monotonic()
            os.kill(old_pid, signum)
            answered_before = len(loop.answers)

            def restarted(old: int = old_pid) -> bool:
                return node.daemon_pid("overlayd") not in (0, old)

            def answered(before: int = answered_before) -> bool:
                return len(loop.answers) >= before + 10

            wait_until(restarted, 60, f"overlayd to be restarted after {signum.name}")
            wait_until(answered, 60, f"answers from the overlayd started after {signum.name}")
            if signum == signal.SIGTERM:
                assert loop.errors == [], "a graceful stop lost queries"
    finally:
        loop.stopping.set()
        thread.join(ANSWER_TIMEOUT + 5)

    assert loop.refused == [], f"refused while overlayd restarted: {loop.refused}"
    # The loop asks one query at a time: only the one asked before the kill
    # can have been read by the killed process and lost with it.
    lost = [what for asked, what in loop.errors if asked < killed_at]
    assert len(lost) <= 1 and len(lost) == len(loop.errors), loop.errors
    assert {answer for _, answer in loop.answers} == {frozenset({address})}
    assert {tcp for tcp, _ in loop.answers} == {True, False}
    node.ctl("down", "resolver", check=True)
