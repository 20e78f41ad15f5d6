"""From ``zlayerctl up -b`` returning to the first 200 through proxyd, and where the time goes.

Each run deploys a fresh one-replica service (busybox ``httpd`` on 8080
behind an http endpoint, the default health check: TCP on the endpoint) with
``zlayerctl up -b``, then asks proxyd for ``/index.html`` every 2 ms until it
answers 200; the figure is the time from ``up -b`` returning to that 200 (the
image is imported first, so nothing is pulled). The deployment is taken down
before the next run.

With ``--timeline`` the bus is watched (``busctl monitor``) and each run's
steps are printed, in ms after ``up -b`` returned (negative: before it
returned), as medians over the runs:

- schedd sends agentd its assignments (``SyncAssignments``);
- agentd's replica is creating, running, healthy (``ReplicaChanged``);
- proxyd has taken the first traffic view with the replica in it (the reply
  to ``SyncTraffic``);
- the first 200.

**Peer**, same run: ``podman run -d --rm`` of the same image and command on
a bridge network of its own (with a fixed address), and the time from its
return to the first 200 from the container's address (no proxy in between:
a floor). ``--no-podman`` skips it.

``--wasm`` times ``examples/wasm-http`` (built with componentize-py) as a
``service_type: wasm_http`` service instead; its first deployment, not
counted, compiles the component into agentd's cache, so every timed run
starts from precompiled code. Beside it, the wasm floor: ``wasmtime serve``
of that compiled component on this host, with the replica's flags, from its
start to its first 200 (what wasmtime's own start costs, with none of ours).

Needs root, crun, conmon, busctl, busybox-static; podman for the peer.

    .venv/bin/python bench/up_first.py [--runs N] [--timeline] [--no-podman] [--wasm]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _cluster import Cluster, percentile, print_table, running_daemons
from proxy_http import free_port
from replica_start import (
    HTTPD,
    IP_FORWARD,
    Peers,
    free_subnets,
    signals_ignored,
    unmount_under,
    zlayer_leftovers,
)

from shared.busybox_image import busybox_image, write_oci_layout

IMAGE = "zlayer/busybox:latest"
POLL = 0.002
FIRST_200_TIMEOUT = 60.0
COLD_TIMEOUT = 600.0  # the first wasm deployment compiles the component

SPEC = """\
version: v1
deployment: {name}
services:
  web:
    image: {image}
    command:
      entrypoint: [sh, -c]
      args: ["{httpd}"]
    endpoints: [{{name: http, protocol: http, port: {port}, target_port: 8080, expose: public}}]
    scale: {{mode: fixed, replicas: 1}}
    stop_signal: SIGKILL
"""

WASM_IMAGE = "localhost/upfirst-http:1"
WASM_SPEC = """\
version: v1
deployment: {name}
services:
  web:
    service_type: wasm_http
    image: {image}
    endpoints: [{{name: http, protocol: http, port: {port}, target_port: 8080, expose: public}}]
    scale: {{mode: fixed, replicas: 1}}
"""
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "wasm-http"

STEPS = (
    "agentd told (SyncAssignments)",
    "replica creating",
    "network attached (Attach done)",
    "replica running",
    "replica healthy",
    "schedd sends proxyd the view",
    "proxyd took it (SyncTraffic done)",
    "first 200",
)


def first_200(url: str, timeout: float = FIRST_200_TIMEOUT) -> float:
    """time.time() when ``url`` first answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return time.time()
        except OSError:
            pass
        time.sleep(POLL)
    raise RuntimeError(f"{url} gave no 200 within {timeout:.0f}s")


@dataclass
class Run:
    deployment: str
    deployed: float  # time.time() when up -b started
    returned: float  # ... when it returned
    answered: float  # ... the first 200
    steps: dict[str, float] = field(default_factory=dict)  # step -> ms after returned


class BusWatch:
    """``busctl monitor`` of the cluster's bus into a file, read afterwards."""

    def __init__(self, cluster: Cluster, path: Path) -> None:
        self.path = path
        self.out = path.open("w")
        self.process = subprocess.Popen(
            ["busctl", f"--address={cluster.bus_address}", "monitor", "--json=short"],
            stdout=self.out,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # subscribed

    def stop(self) -> list[dict[str, Any]]:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.out.close()
        messages = []
        for line in self.path.read_text().splitlines():
            try:
                messages.append(json.loads(line))
            except ValueError:
                continue  # a line cut short when busctl was stopped
        return messages


def timeline(run: Run, messages: list[dict[str, Any]]) -> dict[str, float]:
    """The run's steps, in ms after ``up -b`` returned, from the bus messages."""
    steps: dict[str, float] = {}

    def at(message: dict[str, Any]) -> float:
        return float(message["timestamp-realtime"]) / 1e6

    def ms(when: float) -> float:
        return (when - run.returned) * 1000

    calls = {(m["sender"], m["cookie"]): m for m in messages if m["type"] == "method_call"}
    healthy_at: float | None = None
    for message in messages:
        when = at(message)
        if when < run.deployed or when > run.answered + 0.05:
            continue
        member = message.get("member", "")
        data = message.get("payload", {}).get("data", [])
        if message["type"] == "method_call" and member == "SyncAssignments":
            steps.setdefault(STEPS[0], ms(when))
        elif message["type"] == "method_call" and member == "SyncTraffic":
            if healthy_at is not None and message.get("destination") == "org.zlayer.Proxy1":
                steps.setdefault(STEPS[5], ms(when))
        elif message["type"] == "signal" and member == "ReplicaChanged":
            try:
                info = json.loads(data[0])
            except (ValueError, IndexError, TypeError):
                continue
            if info.get("deployment") != run.deployment:
                continue
            if info.get("state") == "creating":
                steps.setdefault(STEPS[1], ms(when))
            if info.get("state") == "running":
                steps.setdefault(STEPS[3], ms(when))
            if info.get("health") == "healthy" and healthy_at is None:
                healthy_at = when
                steps[STEPS[4]] = ms(when)
        elif message["type"] == "method_return":
            call = calls.get((message.get("destination"), message.get("reply_cookie")))
            if call is None:
                continue
            called = call.get("payload", {}).get("data", [])
            if (
                call.get("member") == "Attach"
                and called
                and str(called[0]).startswith(f"{run.deployment}-")
            ):
                steps.setdefault(STEPS[2], ms(when))
            if (
                healthy_at is not None
                and call.get("member") == "SyncTraffic"
                and call.get("destination") == "org.zlayer.Proxy1"
                and at(call) >= healthy_at
            ):
                steps.setdefault(STEPS[6], ms(when))
    steps[STEPS[-1]] = ms(run.answered)
    return steps


def zlayer_runs(
    cluster: Cluster,
    work: Path,
    runs: int,
    wasm: bool,
    first: int = 0,
    timeout: float = FIRST_200_TIMEOUT,
) -> list[Run]:
    done = []
    for number in range(first, first + runs):
        name = f"upfirst{number}"
        port = free_port()
        spec = work / f"{name}.zlayer.yml"
        if wasm:
            spec.write_text(WASM_SPEC.format(name=name, image=WASM_IMAGE, port=port))
        else:
            spec.write_text(SPEC.format(name=name, image=IMAGE, httpd=HTTPD, port=port))
        deployed = time.time()
        up = cluster.zlayerctl("up", "-b", str(spec))
        returned = time.time()
        if up.returncode != 0:
            raise RuntimeError(f"zlayerctl up -b: {up.stderr.strip()}")
        path = "/" if wasm else "/index.html"
        answered = first_200(f"http://127.0.0.1:{port}{path}", timeout)
        done.append(Run(name, deployed, returned, answered))
        down = cluster.zlayerctl("down", name, timeout=120)
        if down.returncode != 0:
            raise RuntimeError(f"zlayerctl down: {down.stderr.strip()}")
    return done


def import_wasm_http(cluster: Cluster, work: Path) -> None:
    """examples/wasm-http built into a component and imported as WASM_IMAGE."""
    tool = Path(sys.executable).parent / "componentize-py"
    found = str(tool) if tool.exists() else shutil.which("componentize-py")
    if not found:
        raise RuntimeError("componentize-py is not installed; --wasm needs it")
    component = work / "http.wasm"
    subprocess.run(
        [found, "-d", str(EXAMPLE / "wit"), "-w", "proxy", "componentize", "app",
         "-p", str(EXAMPLE), "-o", str(component)],
        check=True, capture_output=True, cwd=work,
    )  # fmt: skip
    layout = work / "http.oci"
    for args in (
        ("wasm", "export", str(component), "--name", WASM_IMAGE, "--output", str(layout)),
        ("image", "import", str(layout), "--name", WASM_IMAGE),
    ):
        done = cluster.zlayerctl(*args, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"zlayerctl {args[0]} {args[1]}: {done.stderr.strip()}")


def wasmtime_runs(cluster: Cluster, work: Path, runs: int) -> list[tuple[float, float, float]]:
    """(started, started, answered) of ``wasmtime serve`` of the component agentd
    compiled, run here as the replica would be, to its first 200."""
    from wasm_run import direct_serve_argv

    from daemons.agentd.wasm import cache_dir, wasmtime

    state = cluster.paths.daemon_state("agentd")
    compiled = max(cache_dir(state).glob("*.cwasm"), key=lambda path: path.stat().st_mtime)
    binary = str(wasmtime(state / "wasm" / "bin").path)
    spec = work / "floor.zlayer.yml"
    times = []
    for _ in range(runs):
        port = free_port()
        spec.write_text(WASM_SPEC.format(name="floor", image=WASM_IMAGE, port=port))
        argv = direct_serve_argv(binary, spec, compiled, port)
        started = time.time()
        serve = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            answered = first_200(f"http://127.0.0.1:{port}/")
        finally:
            serve.terminate()
            serve.wait(timeout=10)
        times.append((started, started, answered))
    return times


def podman_runs(peers: Peers, runs: int) -> list[tuple[float, float, float]]:
    """(started, returned, answered) of each ``podman run -d`` and its first 200."""
    peers.prepare_podman()
    hosts = list(peers.podman_subnet.hosts())[1:]  # the first is the bridge's
    times = []
    for number in range(runs):
        address = str(hosts[number % len(hosts)])
        started = time.time()
        result = peers.podman(
            "run", "-d", "--rm", "--network", peers.network, "--ip", address,
            peers.image_id, "sh", "-c", HTTPD,
        )  # fmt: skip
        returned = time.time()
        cid = result.stdout.strip()
        if cid:
            peers.podman_ids.add(cid)
        if result.returncode != 0:
            raise RuntimeError(f"podman run failed: {result.stderr.strip()}")
        answered = first_200(f"http://{address}:8080/index.html")
        times.append((started, returned, answered))
        peers.podman_rm([cid])
    return times


def report(
    runs: list[Run],
    podman: list[tuple[float, float, float]],
    show_steps: bool,
    what: str,
    floor: list[tuple[float, float, float]],
) -> None:
    """Two tables: from the command's start and from its return to the first 200."""
    ours = [(r.deployed, r.returned, r.answered) for r in runs]
    rows = [(f"zlayerctl up -b, {what} through proxyd", ours)]
    if podman:
        rows.append(("podman run -d, busybox httpd at its address (peer)", podman))
    if floor:
        rows.append(("wasmtime serve of the compiled component, direct", floor))
    for since, index in (("command started", 0), ("command returned", 1)):

        def ms(times: list[tuple[float, float, float]], index: int = index) -> list[float]:
            return [(t[2] - t[index]) * 1000 for t in times]

        peer = statistics.median(ms(podman)) if podman else 0.0
        table = [
            [
                what,
                str(len(times)),
                f"{statistics.median(ms(times)):.0f}",
                f"{percentile(ms(times), 90):.0f}",
                f"{max(ms(times)):.0f}",
                f"{statistics.median(ms(times)) / peer:.2f}x" if peer else "-",
            ]
            for what, times in rows
        ]
        print()
        print_table(
            [f"{since} to first 200", "runs", "median ms", "p90 ms", "max ms", "vs peer"], table
        )
    if not show_steps:
        return
    print()
    step_rows = []
    for step in STEPS:
        found = [r.steps[step] for r in runs if step in r.steps]
        if found:
            step_rows.append(
                [step, str(len(found)), f"{statistics.median(found):.1f}", f"{max(found):.1f}"]
            )
    print_table(["step, ms after up -b returned", "runs", "median", "max"], step_rows)
    print()
    print("each run, ms after up -b returned: " + ", ".join(s.split(" (")[0] for s in STEPS))
    for run in runs:
        cells = [f"{run.steps[s]:.0f}" if s in run.steps else "-" for s in STEPS]
        print(f"  {run.deployment}: " + " ".join(cells))


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--timeline", action="store_true", help="each step, from the bus")
    parser.add_argument("--no-podman", action="store_true", help="skip the podman peer")
    parser.add_argument(
        "--wasm", action="store_true", help="examples/wasm-http as wasm_http instead of busybox"
    )
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("running containers needs root")
    if not options.no_podman and shutil.which("podman") is None:
        sys.exit("podman is not installed (scripts/apt-deps.sh bench), or pass --no-podman")
    signal.signal(signal.SIGTERM, _interrupt)
    forward_before = IP_FORWARD.read_text().strip()
    work = Path(tempfile.mkdtemp(prefix="zlup-", dir="/tmp"))
    zl_net, podman_net = free_subnets(2)
    bridge = f"zlu{os.getpid() % 100000}"
    peers = Peers(work, ipaddress.IPv4Network(podman_net))
    code = 0
    try:
        overlay = f'bridge = "{bridge}"\nsubnet = "{zl_net}"\n'
        with running_daemons({"overlayd": overlay}, zlayer_leftovers) as cluster:
            oci = write_oci_layout(busybox_image(), work / "oci")
            imported = cluster.zlayerctl("image", "import", str(oci), "--name", IMAGE)
            if imported.returncode != 0:
                raise RuntimeError(f"zlayerctl image import: {imported.stderr.strip()}")
            if options.wasm:
                import_wasm_http(cluster, work)
            # One deployment first, not counted: the daemons load the spec models then,
            # and a wasm component is compiled into agentd's cache.
            zlayer_runs(cluster, work, 1, options.wasm, timeout=COLD_TIMEOUT)
            watch = BusWatch(cluster, work / "bus.json") if options.timeline else None
            try:
                runs = zlayer_runs(cluster, work, options.runs, options.wasm, first=1)
            finally:
                messages = watch.stop() if watch is not None else []
            for run in runs:
                run.steps = timeline(run, messages)
            floor = wasmtime_runs(cluster, work, options.runs) if options.wasm else []
        podman = [] if options.no_podman else podman_runs(peers, options.runs)
        what = "wasm_http hello" if options.wasm else "busybox httpd"
        report(runs, podman, options.timeline, what, floor)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        code = 130
    except RuntimeError as exc:
        print(f"up_first: {exc}", file=sys.stderr)
        code = 1
    finally:
        with signals_ignored():
            for what in peers.cleanup():
                print(f"removed {what}", file=sys.stderr)
            unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)
            if IP_FORWARD.read_text().strip() != forward_before:
                IP_FORWARD.write_text(forward_before + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
