"""proxyd's userspace L4: tcp with stream.tls and proxy_protocol, udp sessions, health checks.

The backends are plain asyncio echo servers (tcp and udp) on loopback
addresses; each tcp one remembers the first bytes it received, so the test
can read the PROXY protocol header proxyd sent.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Any, cast

import pytest

from tests.integration.test_proxyd import (
    LoopThread,
    Proxyd,
    common_free_port,
    free_port,
    service,
)
from tests.integration.test_proxyd import (
    proxyd as proxyd,  # the fixture, for this module
)

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class EchoServers:
    """tcp and udp echo on one port of several addresses, prefixing replies with the address."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.port = common_free_port(addresses)
        self.first_bytes: list[bytes] = []
        self.loops = LoopThread()
        self.servers: dict[str, asyncio.Server] = {}
        self.udp: list[asyncio.BaseTransport] = []
        self.loops.run(self._start())

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for address in self.addresses:
            self.servers[address] = await asyncio.start_server(
                lambda r, w, a=address: self._echo(a, r, w), address, self.port
            )

            class Udp(asyncio.DatagramProtocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    self.transport = cast(asyncio.DatagramTransport, transport)

                def datagram_received(self, data: bytes, addr: Any, a: str = address) -> None:
                    self.transport.sendto(a.encode() + b" " + data, addr)

            transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=(address, self.port))
            self.udp.append(transport)

    async def _echo(self, address: str, reader: asyncio.StreamReader, writer: Any) -> None:
        first = True
        try:
            while data := await reader.read(65536):
                if first:
                    self.first_bytes.append(data)
                    first = False
                writer.write(address.encode() + b" " + data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def stop_address(self, address: str) -> None:
        server = self.servers.pop(address)

        async def close() -> None:
            server.close()
            await server.wait_closed()

        self.loops.run(close())

    def close(self) -> None:
        async def close_all() -> None:
            for server in self.servers.values():
                server.close()
            for transport in self.udp:
                transport.close()

        self.loops.run(close_all())
        self.loops.close()


@pytest.fixture
def echo() -> Any:
    servers = EchoServers(["127.0.0.2", "127.0.0.3"])
    try:
        yield servers
    finally:
        servers.close()


def tcp_exchange(port: int, payload: bytes, *, tls_name: str | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock: socket.socket = raw
        if tls_name is not None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(raw, server_hostname=tls_name)
        sock.sendall(payload)
        answer = b""
        while not answer.endswith(payload):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_tcp_stream_tls_and_proxy_protocol(proxyd: Proxyd, echo: EchoServers) -> None:
    proxyd.start()
    tls_port, pp_port = free_port(), free_port()
    proxyd.push(
        "demo",
        [
            service(
                "secure",
                [
                    {
                        "name": "tls",
                        "protocol": "tcp",
                        "port": tls_port,
                        "target_port": echo.port,
                        "expose": "public",
                        "stream": {"tls": True},
                    }
                ],
                ["127.0.0.2", "127.0.0.3"],
            ),
            service(
                "pp",
                [
                    {
                        "name": "pp",
                        "protocol": "tcp",
                        "port": pp_port,
                        "target_port": echo.port,
                        "expose": "public",
                        "stream": {"proxy_protocol": True},
                    }
                ],
                ["127.0.0.3"],
            ),
        ],
    )
    listens = {r.endpoint: r.listen for r in proxyd.routes()}
    assert listens == {"tls": f"127.0.0.1:{tls_port}", "pp": f"127.0.0.1:{pp_port}"}

    # TLS terminated by proxyd; plain bytes at the backend; round-robin over both.
    answers = [tcp_exchange(tls_port, b"ping %d" % i, tls_name="localhost") for i in range(4)]
    assert sorted(a.split()[0] for a in answers) == [b"127.0.0.2"] * 2 + [b"127.0.0.3"] * 2
    assert all(not first.startswith(b"\x16") for first in echo.first_bytes)  # no TLS record

    echo.first_bytes.clear()
    with socket.create_connection(("127.0.0.1", pp_port), timeout=5) as client:
        client.sendall(b"hello")
        client_port = client.getsockname()[1]
        deadline = time.monotonic() + 5
        while not echo.first_bytes and time.monotonic() < deadline:
            time.sleep(0.02)
        answer = client.recv(65536)
        # The header and the client's bytes may reach the echo in two reads.
        while b"hello" not in answer and time.monotonic() < deadline:
            answer += client.recv(65536)
    (first,) = echo.first_bytes
    assert first.startswith(PROXY_V2_SIGNATURE)
    assert first[12] == 0x21 and first[13] == 0x11  # v2 PROXY, TCP over IPv4
    length = int.from_bytes(first[14:16], "big")
    addresses = first[16 : 16 + length]
    assert addresses[:4] == socket.inet_aton("127.0.0.1")  # the client
    assert addresses[4:8] == socket.inet_aton("127.0.0.1")  # the address it reached
    assert int.from_bytes(addresses[8:10], "big") == client_port
    assert int.from_bytes(addresses[10:12], "big") == pp_port
    assert b"hello" in answer and answer.startswith(b"127.0.0.3 ")


def test_health_check_takes_a_failing_backend_out(proxyd: Proxyd, echo: EchoServers) -> None:
    proxyd.start()
    tcp_port = free_port()
    udp_port = free_port(kind=socket.SOCK_DGRAM)
    echo.stop_address("127.0.0.2")  # still in schedd's view, but refusing connections
    proxyd.push(
        "demo",
        [
            service(
                "db",
                [
                    {
                        "name": "db",
                        "protocol": "tcp",
                        "port": tcp_port,
                        "target_port": echo.port,
                        "expose": "public",
                        "stream": {"proxy_protocol": True, "health_check": {"type": "tcp_connect"}},
                    },
                    {
                        "name": "dns",
                        "protocol": "udp",
                        "port": udp_port,
                        "target_port": echo.port,
                        "expose": "public",
                        "stream": {
                            "proxy_protocol": False,
                            "session_timeout": "1s",
                            "tls": False,
                        },
                    },
                ],
                ["127.0.0.2", "127.0.0.3"],
                health_interval=0.2,
            )
        ],
    )
    # udp needs stream.tls or proxy_protocol to be proxyd's: this one is the kernel's.
    assert {r.endpoint for r in proxyd.routes()} == {"db"}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        (route,) = proxyd.routes()
        if route.backends == [f"127.0.0.3:{echo.port}"]:
            break
        time.sleep(0.1)
    assert route.backends == [f"127.0.0.3:{echo.port}"]
    answers = {tcp_exchange(tcp_port, b"q%d" % i).split()[0] for i in range(4)}
    assert answers == {b"127.0.0.3"}


def test_udp_sessions_with_proxy_protocol(proxyd: Proxyd, echo: EchoServers) -> None:
    proxyd.start()
    udp_port = free_port(kind=socket.SOCK_DGRAM)
    proxyd.push(
        "demo",
        [
            service(
                "dns",
                [
                    {
                        "name": "dns",
                        "protocol": "udp",
                        "port": udp_port,
                        "target_port": echo.port,
                        "expose": "public",
                        "stream": {"proxy_protocol": True, "session_timeout": "1s"},
                    }
                ],
                ["127.0.0.2", "127.0.0.3"],
            )
        ],
    )
    (route,) = proxyd.routes()
    assert route.listen == f"udp 127.0.0.1:{udp_port}"
    served = []
    for _ in range(2):  # two client sockets: two sessions, one per backend
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"one", ("127.0.0.1", udp_port))
            first = client.recv(65536)
            client.sendto(b"two", ("127.0.0.1", udp_port))
            second = client.recv(65536)
        backend = first.split()[0]
        assert second.split()[0] == backend  # a session sticks to its backend
        payload = first.split(b" ", 1)[1]
        assert payload.startswith(PROXY_V2_SIGNATURE) and payload[13] == 0x12  # UDP over IPv4
        assert payload.endswith(b"one")
        served.append(backend)
    assert sorted(served) == [b"127.0.0.2", b"127.0.0.3"]
    (stats,) = proxyd.stats()
    assert stats.requests_total == 4 and stats.active_connections == 2
    time.sleep(2.2)  # past the session timeout, swept once a second
    assert proxyd.stats()[0].active_connections == 0

    # The udp socket outlives proxyd: kept by the supervisor, taken back by the
    # next process (a datagram sent while none runs waits for it), dropped
    # when no route uses the port.
    assert proxyd.notify.names() == [f"proxyd-udp-127.0.0.1-{udp_port}"]
    assert proxyd.process is not None
    proxyd.process.kill()
    proxyd.process.communicate(timeout=10)
    proxyd.process = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(15)
        client.sendto(b"while down", ("127.0.0.1", udp_port))
        proxyd.start()
        assert client.recv(65536).endswith(b"while down")
    proxyd.push("demo", [])
    deadline = time.monotonic() + 10
    while proxyd.notify.names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxyd.notify.names() == []


def test_a_flood_of_connections_it_cannot_serve_holds_up_no_other_service(
    proxyd: Proxyd, echo: EchoServers
) -> None:
    """Every connection to a tcp endpoint whose one backend cannot be reached (nothing
    listens at 127.0.0.9) is closed with a warning in the log. proxyd's stderr here
    is a pipe read only when it stops: 3,000 such lines are about five times what it
    holds. The other service still answers while they
    wait (the lines queue in proxyd), and at the stop every one is written."""
    proxyd.start()
    empty_port, echo_port = free_port(), free_port()

    def tcp(name: str, port: int) -> dict[str, Any]:
        return {
            "name": name,
            "protocol": "tcp",
            "port": port,
            "target_port": echo.port,
            "expose": "public",
            "stream": {"proxy_protocol": True},  # proxyd's (plain tcp is the kernel's)
        }

    proxyd.push(
        "demo",
        [
            service("empty", [tcp("db", empty_port)], ["127.0.0.9"]),
            service("echo", [tcp("echo", echo_port)], ["127.0.0.2"]),
        ],
    )
    count = 3000

    async def flood() -> bytes:
        assert await asyncio.to_thread(tcp_exchange, echo_port, b"first")
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", empty_port)
            assert await reader.read() == b""  # closed by proxyd, nothing sent
            writer.close()
        return await asyncio.to_thread(tcp_exchange, echo_port, b"still here")

    loops = LoopThread()
    try:
        # A proxyd whose loop waited for the pipe would close no more connections after
        # the first few hundred: the bound makes that a failure, not a test that hangs.
        answer = loops.run(flood(), timeout=60)
        assert answer.startswith(b"127.0.0.2 ") and answer.endswith(b"still here")
    finally:
        loops.close()
    proxyd.stop()
    assert proxyd.logs.count("demo/empty db: ") == count
