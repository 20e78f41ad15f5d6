"""wasi:http services end to end: a component under ``wasmtime serve`` behind proxyd.

The component is built here from source (``examples/wasm-http/app.py`` through
componentize-py, against the WIT files beside it), packed as an artifact and
imported; it is served on its endpoint's target port in its replica's own
network namespace, routed by proxyd like any backend, health-checked over HTTP,
and reached by its service name from a container replica.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.node import Node, http_get, wait_until

pytestmark = pytest.mark.timeout(400)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wasm-http"


def componentize_py() -> str:
    beside = Path(sys.executable).parent / "componentize-py"
    found = str(beside) if beside.exists() else shutil.which("componentize-py")
    if not found:
        pytest.skip("componentize-py is not installed (pip install componentize-py)")
    return found


def http_component(node: Node) -> str:
    """The example handler built into a component and imported; its image name."""
    module = node.workdir / "http.wasm"
    subprocess.run(
        [componentize_py(), "-d", str(EXAMPLE / "wit"), "-w", "proxy", "componentize", "app",
         "-p", str(EXAMPLE), "-o", str(module)],
        check=True, capture_output=True, timeout=300, cwd=node.workdir,
    )  # fmt: skip
    reference = "localhost/wasm-http:1"
    layout = node.workdir / "http.oci"
    node.ctl(
        "wasm", "export", str(module), "--name", reference, "--output", str(layout), check=True
    )
    node.ctl("image", "import", str(layout), "--name", reference, check=True)
    return reference


def test_a_wasi_http_service_answers_through_proxyd_and_by_its_name(node: Node) -> None:
    image = http_component(node)
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
