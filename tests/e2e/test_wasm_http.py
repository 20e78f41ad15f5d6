"""wasi:http services end to end: a component under ``wasmtime serve`` behind proxyd.

The component is the tests' wasi:http handler (``tests/data/wasm-http-test``, built
once per run through componentize-py against the WIT files of ``examples/wasm-http``):
its ``/read`` reads the whole request body before it answers, and any other path is
the example's own handler (``examples/wasm-http/app.py``). It is packed as an artifact
and imported once; it is served on its endpoint's target port in its replica's own
network namespace, routed by proxyd like any backend, health-checked over HTTP,
and reached by its service name from a container replica.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.e2e.node import Node, http_get, wait_until
from tests.wasm_components import HTTP_TEST, HTTP_TEST_IMAGE, Component, WasmComponents


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = pytest.mark.timeout(400)

# What this module asks the session's wasm_components for (built ahead: the e2e conftest).
WASM_COMPONENTS = [(HTTP_TEST, HTTP_TEST_IMAGE)]


def import_component(
    node: Node, components: WasmComponents, component: Component, reference: str
) -> str:
    """The component, packed once per run, imported into the node; its image name."""
    layout = components.layout(component, reference)
    node.ctl("image", "import", str(layout), "--name", reference, timeout=300, check=True)
    return reference


@pytest.fixture(scope="module")
def http_image(node: Node, wasm_components: WasmComponents) -> str:
    """The tests' handler, imported once: every test here runs the same image, which
    agentd compiles once."""
    return import_component(node, wasm_components, HTTP_TEST, HTTP_TEST_IMAGE)


def test_a_wasi_http_service_answers_through_proxyd_and_by_its_name(
    node: Node, http_image: str
) -> None:
    image = http_image
    spec = node.spec(
        "wasmhttp",
        f"""
        version: v1
        deployment: wasmhttp
        services:
          hello:
            service_type: wasm_http
            image: {image}
            endpoints:
              - {{name: http, protocol: http, port: {node.http_port}, target_port: 8080,
                  expose: public}}
            health:
              interval: 1s
              timeout: 2s
              check: {{type: http, url: /}}
            scale: {{mode: fixed, replicas: 1}}
            wasm: {{request_timeout: 5s}}
          client:
            image: zlayer/busybox:latest
            command: {{entrypoint: ["sleep", "1000"]}}
            scale: {{mode: fixed, replicas: 1}}
        """,
    )
    # The first start compiles the component (once per digest): allow for it.
    node.ctl("up", "-d", str(spec), "--timeout", "240", check=True, timeout=300)
    try:
        (replica,) = [r for r in node.replicas("wasmhttp") if r["service"] == "hello"]
        assert replica["health"] == "healthy", replica

        def through_proxy() -> str:
            try:
                return http_get(f"http://127.0.0.1:{node.http_port}/")
            except OSError:
                return ""

        assert wait_until(through_proxy, 30, "an answer through proxyd") == "hello from wasm\n"
        direct = http_get(f"http://{replica['address']}:8080/")
        assert direct == "hello from wasm\n"
        by_name = node.ctl(
            "exec", "client", "-d", "wasmhttp", "--",
            "wget", "-q", "-O", "-", "http://hello:8080/",
        )  # fmt: skip
        assert by_name.returncode == 0 and by_name.stdout == "hello from wasm\n", by_name
    finally:
        node.ctl("down", "wasmhttp")


def post(address: str, body: bytes, length: int) -> socket.socket:
    """A POST to the handler's ``/read`` (it answers once it has read the whole body) of
    ``length`` bytes, whose first ``body`` are sent now."""
    conn = socket.create_connection((address, 8080), timeout=10)
    conn.sendall(
        f"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        .encode() + body
    )  # fmt: skip
    return conn


def answer(conn: socket.socket, within: float) -> str:
    """The body line of the response, or "" if none came ``within`` seconds."""
    conn.settimeout(within)
    got = b""
    try:
        while b"bytes" not in got:
            chunk = conn.recv(4096)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        return ""
    found = re.search(r"read \d+ bytes", got.decode())
    return found.group(0) if found else ""


def test_max_instances_caps_the_requests_each_replica_runs_at_once(
    node: Node, http_image: str
) -> None:
    image = http_image
    spec = node.spec(
        "wasmcap",
        f"""
        version: v1
        deployment: wasmcap
        services:
          one:
            service_type: wasm_http
            image: {image}
            endpoints: [{{name: http, protocol: http, port: 8080}}]
            scale: {{mode: fixed, replicas: 1}}
            wasm: {{max_instances: 1}}
          two:
            service_type: wasm_http
            image: {image}
            endpoints: [{{name: http, protocol: http, port: 8080}}]
            scale: {{mode: fixed, replicas: 1}}
            wasm: {{max_instances: 2}}
        """,
    )
    node.ctl("up", "-d", str(spec), "--timeout", "240", check=True, timeout=300)
    try:
        address = {r["service"]: str(r["address"]) for r in node.replicas("wasmcap")}
        for service, waits in (("one", True), ("two", False)):
            held = post(address[service], b"12345", 10)
            with held:
                # The held request is in its instance before the other one comes.
                time.sleep(0.5)
                with post(address[service], b"xyz", 3) as other:
                    if waits:  # the one instance is busy: the other request waits its turn
                        assert answer(other, 3) == ""
                        held.sendall(b"67890")
                        assert answer(held, 10) == "read 10 bytes"
                        assert answer(other, 10) == "read 3 bytes"
                    else:  # a second instance answers it meanwhile
                        assert answer(other, 10) == "read 3 bytes"
                        held.sendall(b"67890")
                        assert answer(held, 10) == "read 10 bytes"
    finally:
        node.ctl("down", "wasmcap")
