"""The REST API's overhead: ``GET /api/v1/deployments`` beside the ``ListDeployments`` bus
call it makes, at 50 concurrent clients each, in the same run.

Starts the six daemons with ``zlayerctl daemon run --detach`` under a fresh
temporary prefix (free ports, its own private dbus-daemon; apid's per-token
rate limit off), stores a few deployments of zero replicas (so the list is
not empty and nothing runs), makes a viewer token over the bus, then
measures, each way for the same time after a warm-up:

- bus, direct: ``SchedulerClient(bus).list_deployments()`` from asyncio, 50
  calls in flight on one sdbus connection; the peer, what apid itself does.
- HTTP, aiohttp client: 50 concurrent clients (one keep-alive connection
  each) sending ``GET /api/v1/deployments`` with the bearer token.
- HTTP, wrk: the same request from 50 connections (``wrk -c50 --latency``),
  where wrk is installed: a client that costs the machine little.

Each line shows p50 and p99 in milliseconds, requests a second, errors
(non-2xx replies or failed calls), and p50's difference to the bus's. The
goal is p50 within 1 ms of the bus call's and no error.

Run: ``.venv/bin/python bench/api.py`` (``--seconds N``, ``--clients N``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import Cluster, percentile, print_table, running_daemons

from shared.bus import open_bus
from shared.clients import ApiClient, SchedulerClient
from shared.wire.api import TokenCreate

WARMUP_SECONDS = 2.0
DEPLOYMENTS = 5
PATH = "/api/v1/deployments"
REST_API = re.compile(r"REST API on (\S+):(\d+)")
SPEC = """\
version: v1
deployment: bench{n}
services:
  web:
    image: zlayer/busybox:latest
    command: {{entrypoint: ["sleep", "3600"]}}
    scale: {{mode: fixed, replicas: 0}}
"""


class Sampled:
    """Latencies (ms) and errors of one way, over a measured span."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.seconds = 0.0


async def _load(clients: int, seconds: float, call: Callable[[], Awaitable[bool]]) -> Sampled:
    """``clients`` loops each making one call after another for ``seconds``."""
    result = Sampled()
    measuring = False
    stop_at = time.monotonic() + WARMUP_SECONDS + seconds

    async def client() -> None:
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                ok = await call()
            except Exception:
                ok = False
            taken = (time.perf_counter() - start) * 1000
            if measuring:
                result.latencies.append(taken)
                result.errors += 0 if ok else 1

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(WARMUP_SECONDS)
    measuring = True
    began = time.monotonic()
    await asyncio.gather(*tasks)
    result.seconds = time.monotonic() - began
    return result


async def _bus_way(address: str, clients: int, seconds: float) -> Sampled:
    bus = open_bus(address)
    scheduler = SchedulerClient(bus)
    assert len(await scheduler.list_deployments()) == DEPLOYMENTS

    async def call() -> bool:
        await scheduler.list_deployments()
        return True

    try:
        return await _load(clients, seconds, call)
    finally:
        bus.close()


async def _http_way(url: str, token: str, clients: int, seconds: float) -> Sampled:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    # one keep-alive connection per client, as 50 separate callers would hold
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        async with session.get(url) as first:
            assert first.status == 200, await first.text()
            assert len(json.loads(await first.read())) == DEPLOYMENTS

        async def call() -> bool:
            async with session.get(url) as reply:
                await reply.read()
                return reply.status == 200

        return await _load(clients, seconds, call)


def _wrk_way(url: str, token: str, clients: int, seconds: float) -> tuple[float, float, float, int]:
    """(p50 ms, p99 ms, requests/s, errors) from wrk."""
    wrk = shutil.which("wrk")
    assert wrk is not None
    argv = [
        wrk,
        f"-t{min(2, clients)}",
        f"-c{clients}",
        "--latency",
        "-H",
        f"Authorization: Bearer {token}",
    ]
    subprocess.run([*argv, "-d2s", url], capture_output=True, check=True)  # warm-up
    out = subprocess.run(
        [*argv, f"-d{int(seconds)}s", url], capture_output=True, text=True, check=True
    ).stdout

    def latency(label: str) -> float:
        found = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert found, out
        value = float(found.group(1))
        return {"us": value / 1000, "ms": value, "s": value * 1000}[found.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rate, out
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return latency("50%"), latency("99%"), float(rate.group(1)), errors


def _prepare(cluster: Cluster) -> tuple[str, str]:
    """Deployments stored, a viewer token made: (the list's URL, the token)."""
    from shared.busybox_image import busybox_image, write_oci_layout

    with tempfile.TemporaryDirectory() as work:
        layout = write_oci_layout(busybox_image(), Path(work) / "oci")
        done = cluster.zlayerctl("image", "import", str(layout), "--name", "zlayer/busybox:latest")
        assert done.returncode == 0, done.stderr
        for n in range(DEPLOYMENTS):
            spec = Path(work) / f"bench{n}.zlayer.yml"
            spec.write_text(SPEC.format(n=n))
            done = cluster.zlayerctl("up", "-d", str(spec), timeout=120)
            assert done.returncode == 0, done.stderr
    rows = json.loads(cluster.zlayerctl("status", "--format", "json").stdout)
    detail = next(r["detail"] for r in rows if r["name"] == "apid")
    found = REST_API.search(detail)
    assert found, detail
    url = f"http://{found.group(1)}:{found.group(2)}{PATH}"

    async def token() -> str:
        bus = open_bus(cluster.bus_address)
        try:
            issued = await ApiClient(bus).create_token(
                TokenCreate(name="bench", role="viewer", ttl_seconds=3600)
            )
        finally:
            bus.close()
        return issued.token

    return url, asyncio.run(token())


def run(cluster: Cluster, clients: int, seconds: float) -> None:
    url, token = _prepare(cluster)
    time.sleep(1.0)  # let the deploys' last events settle
    bus = asyncio.run(_bus_way(cluster.bus_address, clients, seconds))
    http = asyncio.run(_http_way(url, token, clients, seconds))
    base50 = percentile(bus.latencies, 50)
    rows = []
    for what, sampled in (
        (f"bus ListDeployments (sdbus, {clients} in flight)", bus),
        (f"HTTP GET {PATH} (aiohttp, {clients} clients)", http),
    ):
        p50 = percentile(sampled.latencies, 50)
        rows.append(
            [
                what,
                f"{p50:.2f}",
                f"{percentile(sampled.latencies, 99):.2f}",
                f"{len(sampled.latencies) / sampled.seconds:.0f}",
                str(sampled.errors),
                f"{p50 - base50:+.2f}",
            ]
        )
    if shutil.which("wrk"):
        p50, p99, rate, errors = _wrk_way(url, token, clients, seconds)
        rows.append(
            [
                f"HTTP GET {PATH} (wrk, {clients} connections)",
                f"{p50:.2f}",
                f"{p99:.2f}",
                f"{rate:.0f}",
                str(errors),
                f"{p50 - base50:+.2f}",
            ]
        )
    else:
        print("wrk is not installed: its line is left out (sudo ./scripts/apt-deps.sh bench)")
    print(f"{DEPLOYMENTS} deployments listed; {seconds:g} s a way, after {WARMUP_SECONDS:g} s")
    print_table(["what", "p50 ms", "p99 ms", "req/s", "errors", "p50 vs bus ms"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients per way")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per way")
    args = parser.parse_args()
    try:
        with running_daemons(config={"apid": "rate_per_second = 0\n"}) as cluster:
            run(cluster, args.clients, args.seconds)
    except KeyboardInterrupt:
        print("interrupted; daemons stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
