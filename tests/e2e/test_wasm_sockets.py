"""A WebAssembly replica's sockets: off unless the spec grants them.

The module is a WASI preview 2 command (preview 1 has no socket API) built once per
run from Python source (``tests/data/wasm-netclient``) with componentize-py against
the WASI WIT files of ``examples/wasm-http``: given ``tcp HOST:PORT`` it connects,
sends a line and prints the answer; given ``udp HOST:PORT`` it sends a datagram and
prints the reply. A refused socket prints the error and exits non-zero. The listeners are
this test's own, on the node network's gateway address, so every connection
that reaches them is counted.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from daemons.overlayd.settings import OverlaySettings
from tests.e2e.node import Node
from tests.e2e.test_wasm_http import import_component
from tests.wasm_components import NET_CLIENT, NET_CLIENT_IMAGE, WasmComponents

# What this module asks the session's wasm_components for (built ahead: the e2e conftest).
WASM_COMPONENTS = [(NET_CLIENT, NET_CLIENT_IMAGE)]


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = pytest.mark.timeout(400)


@dataclass
class Listeners:
    """A TCP and a UDP listener that answer each message and keep what they got."""

    address: str
    tcp: socket.socket = field(init=False)
    udp: socket.socket = field(init=False)
    heard: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tcp = socket.create_server((self.address, 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((self.address, 0))
        threading.Thread(target=self._serve_tcp, daemon=True).start()
        threading.Thread(target=self._serve_udp, daemon=True).start()

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    self.heard.append(conn.recv(100))
                    conn.sendall(b"pong\n")
                except OSError:
                    continue

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(100)
                self.heard.append(data)
                self.udp.sendto(b"upong", peer)
            except OSError:
                return

    def target(self, kind: str) -> str:
        listener = self.tcp if kind == "tcp" else self.udp
        return f"{self.address}:{listener.getsockname()[1]}"

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


@pytest.fixture
def listeners(node: Node) -> Iterator[Listeners]:
    gateway = OverlaySettings.load("overlayd", node.paths).subnet.network_address + 1
    found = Listeners(str(gateway))
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(scope="module")
def net_client(node: Node, wasm_components: WasmComponents) -> str:
    """The client component, imported once; its image name."""
    return import_component(node, wasm_components, NET_CLIENT, NET_CLIENT_IMAGE)


def run_job(node: Node, service: str) -> tuple[int, str, dict[str, object]]:
    """Trigger the job, wait for it: its exit status, its log and its last run."""
    run = node.ctl("job", "trigger", service, "-d", "wasmnet", "--wait", timeout=120)
    logs = node.ctl("logs", service, "-d", "wasmnet", "-n", "20").stdout
    status = json.loads(
        node.ctl("job", "status", service, "-d", "wasmnet", "--format", "json").stdout
    )
    return run.returncode, logs, status[0]


def test_sockets_are_refused_unless_the_spec_allows_tcp_or_udp(
    node: Node, listeners: Listeners, net_client: str
) -> None:
    image = net_client
    jobs = {
        "tcp-off": ("tcp", ""),
        "udp-off": ("udp", "wasm: {allow_tcp: true}"),  # TCP granted is not UDP
        "tcp-on": ("tcp", "wasm: {allow_tcp: true}"),
        "udp-on": ("udp", "wasm: {allow_udp: true}"),
    }
    services = "".join(
        f"  {name}:\n"
        "    rtype: job\n"
        f"    image: {image}\n"
        f'    command: {{args: ["{kind}", "{listeners.target(kind)}", "{name}"]}}\n'
        f"    {grant}\n"
        for name, (kind, grant) in jobs.items()
    )
    spec = node.spec("wasmnet", f"version: v1\ndeployment: wasmnet\nservices:\n{services}")
    # The first start compiles the component (once per digest): allow for it.
    node.ctl("up", "-d", str(spec), "--timeout", "240", check=True, timeout=300)
    try:
        for name in ("tcp-off", "udp-off"):
            code, logs, status = run_job(node, name)
            kind = jobs[name][0]
            assert code != 0 and status["state"] == "failed", (code, status)
            assert f"{kind} failed: PermissionError" in logs, logs

        code, logs, _status = run_job(node, "tcp-on")
        assert code == 0 and "received pong" in logs, (code, logs)
        code, logs, _status = run_job(node, "udp-on")
        assert code == 0 and "received upong" in logs, (code, logs)
        # Only the granted jobs reached the listeners, whenever they ran.
        assert set(listeners.heard) == {b"tcp-on over tcp\n", b"udp-on over udp"}
    finally:
        node.ctl("down", "wasmnet")
