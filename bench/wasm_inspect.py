"""What ``zlayerctl wasm info`` costs, next to wasmtime-py compiling the same binary.

Builds a WASI preview 1 module from generated WAT (``--functions`` small
functions, each exported, plus a handful of WASI imports) with
``wasmtime.wat2wasm``, then times on the same bytes, taking turns:

- shared.wasm.inspect: the section parser behind ``wasm info`` (kind,
  imports with signatures, exports, WASI version); the figure under test.
- wasmtime Module.validate: wasmtime's validation alone (what ``wasm
  validate`` adds on top of the parser).
- wasmtime Module(engine, bytes): wasmtime-py's own compile of the module,
  the peer named in the issue.

and, once each, the wall time of the ``zlayerctl wasm info --format json``
process (Python start-up and imports included). Each line shows the median
and p90 in milliseconds and the ratio of wasmtime's compile to it.

Needs no daemon. Run: ``.venv/bin/python bench/wasm_inspect.py``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wasmtime
from _cluster import timed_calls

from ctl.supervisor import find_executable
from shared.wasm import inspect

WASI_IMPORTS = (
    ("fd_write", "(param i32 i32 i32 i32) (result i32)"),
    ("fd_read", "(param i32 i32 i32 i32) (result i32)"),
    ("environ_get", "(param i32 i32) (result i32)"),
    ("clock_time_get", "(param i32 i64 i32) (result i32)"),
    ("proc_exit", "(param i32)"),
)


def generated_module(functions: int) -> bytes:
    lines = ["(module"]
    for name, signature in WASI_IMPORTS:
        lines.append(f'  (import "wasi_snapshot_preview1" "{name}" (func ${name} {signature}))')
    lines.append('  (memory (export "memory") 2)')
    for number in range(functions):
        lines.append(
            f'  (func (export "f{number}") (param i32 i32) (result i32)\n'
            f"    (i32.add (i32.mul (local.get 0) (i32.const {number + 1})) (local.get 1)))"
        )
    lines.append(")")
    return bytes(wasmtime.wat2wasm("\n".join(lines)))


def p90(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--functions", type=int, default=2000, help="functions in the module")
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each way, per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds the ways take turns in")
    args = parser.parse_args()

    data = generated_module(args.functions)
    engine = wasmtime.Engine()
    ways: dict[str, Callable[[], object]] = {
        "shared.wasm.inspect (wasm info)": lambda: inspect(data),
        "wasmtime Module.validate": lambda: wasmtime.Module.validate(engine, data),
        "wasmtime Module() compile": lambda: wasmtime.Module(engine, data),
    }
    for work in ways.values():  # warm-up: imports, caches, the engine
        work()
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, work in ways.items():
            samples[name] += timed_calls(work, args.runs)

    with tempfile.TemporaryDirectory(prefix="zlwasm-bench-") as directory:
        path = Path(directory) / "bench.wasm"
        path.write_bytes(data)
        command = [find_executable("zlayerctl"), "wasm", "info", str(path), "--format", "json"]
        subprocess.run(command, check=True, capture_output=True)
        samples["zlayerctl wasm info (process)"] = timed_calls(
            lambda: subprocess.run(command, check=True, capture_output=True), 5
        )

    peer = statistics.median(samples["wasmtime Module() compile"])
    info = inspect(data)
    print(
        f"module: {len(data)} bytes, {info.functions} functions, {len(info.imports)} imports, "
        f"{len(info.exports)} exports, WASI {info.wasi}"
    )
    print(f"{'way':<34} {'median ms':>10} {'p90 ms':>10} {'compile / this':>15}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:<34} {median:>10.3f} {p90(values):>10.3f} {peer / median:>14.1f}x")


if __name__ == "__main__":
    main()
