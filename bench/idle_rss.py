"""Idle memory of the six daemons, next to the bare processes they are built from.

Starts the six daemons with ``zlayerctl daemon run --detach`` under a fresh
temporary prefix (free ports, its own private dbus-daemon), lets them idle
for a few seconds after ready, then reads ``/proc/PID/smaps_rollup`` of the
PIDs that ``zlayerctl status --format json`` reports:

- each daemon's RSS, PSS and USS, and the total of each;
- the private dbus-daemon's and the supervisor's (``zlayerctl daemon run``),
  shown apart from the total;
- the peers, started by this benchmark and killed by their PIDs: a bare
  interpreter (``python -c "import time; time.sleep(60)"``, the same
  interpreter the daemons run on) and a bare sdbus + asyncio process holding
  a name on the same bus and idling.

The ratios printed are the six daemons' totals against six of the bare
sdbus + asyncio process: what the scaffold and each daemon's own code add on
top of "a Python process on the bus". RSS counts shared library pages in
every process, so the RSS sum overstates what six processes really take;
USS (pages only that process maps) understates it. PSS (proportional set
size: each shared page divided among the processes mapping it) adds up: the
PSS sum is what the six take together, and the figure to read. The peers'
PSS is measured while the daemons run, so their shared pages are divided
among the daemons too.

Run: ``.venv/bin/python bench/idle_rss.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import Cluster, print_table, running_daemons

from shared.bus import DAEMONS

KIB = 1024
MIB = 1024 * KIB

BARE_PYTHON = "import time; time.sleep(60)"

# Only asyncio and sdbus: the floor every daemon stands on.
BARE_SDBUS = """
import asyncio, os, sys
import sdbus

async def main() -> None:
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = sys.argv[1]
    sdbus.set_default_bus(sdbus.sd_bus_open_system())
    await sdbus.request_default_bus_name_async("org.zlayer.BenchIdle")
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _memory(pid: int) -> tuple[float, float, float]:
    """RSS, PSS and USS of ``pid`` in MiB, from ``/proc/PID/smaps_rollup``."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * KIB
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields["Rss"] / MIB, fields["Pss"] / MIB, uss / MIB


def _daemon_pids(cluster: Cluster) -> dict[str, int]:
    result = cluster.zlayerctl("status", "--format", "json")
    if result.returncode != 0:
        raise RuntimeError(f"zlayerctl status failed ({result.returncode}): {result.stderr}")
    rows = json.loads(result.stdout)
    pids = {row["name"]: int(row["pid"]) for row in rows if row["state"] == "running"}
    missing = [info.name for info in DAEMONS if not pids.get(info.name)]
    if missing:
        raise RuntimeError(f"not running: {', '.join(missing)}")
    return pids


@contextlib.contextmanager
def _peers(address: str) -> Iterator[tuple[int, int]]:
    """The bare interpreter and the bare sdbus process, ready; killed by PID on exit."""
    started: list[subprocess.Popen[str]] = []
    try:
        bare = subprocess.Popen(
            [sys.executable, "-c", BARE_PYTHON], stdin=subprocess.DEVNULL, text=True
        )
        started.append(bare)
        on_bus = subprocess.Popen(
            [sys.executable, "-c", BARE_SDBUS, address],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(on_bus)
        assert on_bus.stdout is not None
        # "ready" once it holds its name; an empty line if it died first.
        if on_bus.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare sdbus process did not get on the bus")
        yield bare.pid, on_bus.pid
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


def run(cluster: Cluster, idle: float) -> None:
    with _peers(cluster.bus_address) as (bare_pid, on_bus_pid):
        print(f"idling {idle:.0f}s after ready ...", file=sys.stderr)
        time.sleep(idle)
        pids = _daemon_pids(cluster)
        daemons = {name: _memory(pid) for name, pid in pids.items()}
        dbus_daemon = _memory(cluster.state.bus_pid)
        supervisor = _memory(cluster.state.pid)
        bare = _memory(bare_pid)
        on_bus = _memory(on_bus_pid)

    totals = tuple(sum(m[i] for m in daemons.values()) for i in range(3))
    rows = [[f"zlayer-{n}", str(pids[n]), *_mib(m)] for n, m in daemons.items()]
    rows.append(["total, six daemons", "", *_mib(totals)])
    rows.append(["private dbus-daemon", str(cluster.state.bus_pid), *_mib(dbus_daemon)])
    rows.append(["supervisor (zlayerctl daemon run)", str(cluster.state.pid), *_mib(supervisor)])
    rows.append(["peer: bare python, time.sleep", str(bare_pid), *_mib(bare)])
    rows.append(["peer: bare sdbus + asyncio on the bus", str(on_bus_pid), *_mib(on_bus)])
    print(f"idle memory after {idle:.0f}s, MiB")
    print_table(["process", "pid", "RSS MiB", "PSS MiB", "USS MiB"], rows)
    print()
    print_table(
        ["ratio", "RSS", "PSS", "USS"],
        [
            ["six daemons vs 6x bare sdbus + asyncio", *_ratios(totals, on_bus)],
            ["six daemons vs 6x bare python", *_ratios(totals, bare)],
        ],
    )


def _mib(memory: tuple[float, ...]) -> list[str]:
    return [f"{value:.1f}" for value in memory]


def _ratios(totals: tuple[float, ...], peer: tuple[float, ...]) -> list[str]:
    return [f"{total / (6 * one):.2f}x" for total, one in zip(totals, peer, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=5.0, help="seconds to idle after ready")
    args = parser.parse_args()
    try:
        with running_daemons() as cluster:
            run(cluster, args.idle)
    except KeyboardInterrupt:
        print("interrupted; daemons stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
