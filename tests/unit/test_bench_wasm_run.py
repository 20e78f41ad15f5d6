"""bench/wasm_run.py's floor: direct ``wasmtime serve`` runs with the replica's caps."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from daemons.agentd import wasm
from shared.spec import parse_spec

BENCH = Path(__file__).resolve().parents[2] / "bench" / "wasm_run.py"


def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_wasm_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_direct_floor_is_capped_as_the_replica_is(tmp_path: Path) -> None:
    spec = tmp_path / "hello.zlayer.yml"
    spec.write_text(
        "version: v1\ndeployment: benchhttp\nservices:\n  hello:\n"
        "    service_type: wasm_http\n    image: localhost/benchhttp:1\n"
        "    endpoints: [{name: http, protocol: http, port: 8000, target_port: 8080}]\n"
    )
    argv = bench_module().direct_serve_argv("wasmtime", spec, tmp_path / "c.cwasm", 9000)
    (service,) = parse_spec(spec.read_text()).services.values()
    replica = wasm.serve_flags(service)
    assert option(argv, "--max-concurrent-requests") == option(replica, "--max-concurrent-requests")
    assert option(argv, "--idle-instance-timeout") == option(replica, "--idle-instance-timeout")
    assert option(argv, "--addr") == "127.0.0.1:9000"
    assert argv[-1] == str(tmp_path / "c.cwasm")
    assert [a for a in argv if a.startswith("timeout=")] == [
        a for a in replica if a.startswith("timeout=")
    ]
