"""Round-trip latency of one D-Bus call: ``Status`` on org.zlayer.Scheduler1.

Starts the six daemons with ``zlayerctl daemon run --detach`` under a fresh
temporary prefix (free ports, its own private dbus-daemon), then times the
same method call, client -> dbus-daemon -> zlayer-schedd -> back, four ways:

- zlayer client: ``await SchedulerClient(bus).status()`` from asyncio, the way
  zlayerctl calls it (sdbus, shared.clients); the figure under test.
- raw sd-bus, async: ``bus.new_method_call_message`` + ``await
  bus.call_async(msg)`` + ``get_contents()`` on the same asyncio loop; sdbus's
  low-level API without the proxy layer.
- raw sd-bus, blocking: the same message with ``bus.call(msg)``; libsystemd's
  own round trip with no event loop at all.
- busctl: wall time of one ``busctl --address=... call ...`` process per
  call, fork/exec and connection setup included, as a shell script would pay.

Each line shows p50 and p99 in microseconds and the ratio to the proxy's.
Calls are sequential (one in flight); the three in-process ways take
turns in blocks of 500 so background load hits them alike.

Run: ``.venv/bin/python bench/bus_roundtrip.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import Cluster, percentile, print_table, running_daemons

from shared.bus import DAEMONS_BY_NAME, open_bus
from shared.clients import SchedulerClient
from shared.wire.daemon import DaemonStatus

SCHEDD = DAEMONS_BY_NAME["schedd"]
WARMUP = 200
ROUNDS = 4  # the in-process ways alternate in this many blocks
SETTLE = 2.0  # seconds idle after ready before measuring


def _message(bus: Any) -> Any:
    return bus.new_method_call_message(
        SCHEDD.bus_name, SCHEDD.object_path, SCHEDD.bus_name, "Status"
    )


async def _in_process_calls(address: str, calls: int) -> dict[str, list[float]]:
    """Microseconds per call for the three in-process ways.

    The ways take turns in ``ROUNDS`` blocks, so a burst of load from
    elsewhere on the machine lands on all of them rather than on one.
    """
    bus = open_bus(address)
    client = SchedulerClient(bus)
    assert (await client.status()).name == "schedd"
    # A second connection for blocking calls: never block on the loop's own bus.
    blocking_bus = open_bus(address)
    contents: Any = blocking_bus.call(_message(blocking_bus)).get_contents()
    assert DaemonStatus.from_dbus(contents).name == "schedd", contents

    async def via_proxy() -> None:
        await client.status()

    async def via_raw_async() -> None:
        reply = await bus.call_async(_message(bus))
        reply.get_contents()

    async def via_raw_blocking() -> None:
        blocking_bus.call(_message(blocking_bus)).get_contents()

    ways = {"proxy": via_proxy, "raw_async": via_raw_async, "raw_blocking": via_raw_blocking}
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for call in ways.values():
        for _ in range(WARMUP):
            await call()
    per_round = -(-calls // ROUNDS)
    for _ in range(ROUNDS):
        for name, call in ways.items():
            taken = samples[name]
            for _ in range(min(per_round, calls - len(taken))):
                start = time.perf_counter_ns()
                await call()
                taken.append((time.perf_counter_ns() - start) / 1000)
    blocking_bus.close()
    bus.close()
    return samples


def _busctl_calls(address: str, runs: int) -> list[float]:
    """Microseconds of wall time per ``busctl call`` process."""
    busctl = shutil.which("busctl")
    if busctl is None:
        raise FileNotFoundError("busctl is not installed (it comes with systemd)")
    argv = [
        busctl,
        f"--address={address}",
        "call",
        SCHEDD.bus_name,
        SCHEDD.object_path,
        SCHEDD.bus_name,
        "Status",
    ]
    first = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert first.stdout.startswith('(sssutsss) "schedd"'), first.stdout
    for _ in range(min(WARMUP, 20)):
        subprocess.run(argv, capture_output=True, check=True)
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        subprocess.run(argv, capture_output=True, check=True)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def run(cluster: Cluster, calls: int, busctl_runs: int) -> None:
    address = cluster.bus_address
    time.sleep(SETTLE)  # let the daemons finish starting up
    samples = asyncio.run(_in_process_calls(address, calls))
    via_proxy = samples["proxy"]
    busctl = _busctl_calls(address, busctl_runs)

    base50 = percentile(via_proxy, 50)
    base99 = percentile(via_proxy, 99)
    rows = []
    for what, taken in (
        ("zlayer proxy (asyncio, sdbus)", via_proxy),
        ("raw sd-bus call_async (asyncio)", samples["raw_async"]),
        ("raw sd-bus call (blocking)", samples["raw_blocking"]),
        ("busctl call, one process each", busctl),
    ):
        p50 = percentile(taken, 50)
        p99 = percentile(taken, 99)
        rows.append(
            [
                what,
                str(len(taken)),
                f"{p50:.1f}",
                f"{p99:.1f}",
                f"{p50 / base50:.2f}x",
                f"{p99 / base99:.2f}x",
            ]
        )
    print(f"Status on {SCHEDD.bus_name} through dbus-daemon, sequential calls")
    print_table(["what", "calls", "p50 us", "p99 us", "p50 vs proxy", "p99 vs proxy"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="in-process calls per way")
    parser.add_argument("--busctl-runs", type=int, default=200, help="busctl processes")
    args = parser.parse_args()
    try:
        with running_daemons() as cluster:
            run(cluster, args.calls, args.busctl_runs)
    except KeyboardInterrupt:
        print("interrupted; daemons stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
