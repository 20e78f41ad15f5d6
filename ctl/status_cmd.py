"""``zlayerctl status``: each daemon's state, version, pid and supervisor."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import click
from sdbus import SdBus

from ctl.errors import NOT_RUNNING
from ctl.output import fail, format_option, print_json, print_table
from shared.bus import DAEMONS, DaemonInfo, open_bus, resolve_bus_address
from shared.clients import daemon_client
from shared.paths import Paths
from shared.wire import to_builtins
from shared.wire.daemon import DaemonStatus

CALL_TIMEOUT = 3.0
EXIT_NOT_ALL_RUNNING = 3  # as `systemctl status` does for units not running


def _uptime(started_at_usec: int) -> str:
    seconds = max(0, int(time.time() - started_at_usec / 1_000_000))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


async def _query(info: DaemonInfo, bus: SdBus) -> DaemonStatus | str:
    try:
        return await asyncio.wait_for(daemon_client(info.name, bus).status(), CALL_TIMEOUT)
    except TimeoutError:
        return "not answering"
    except Exception:  # the name has no owner: not running
        return "not running"


async def collect(paths: Paths) -> list[dict[str, Any]]:
    """One row per daemon, from the bus and the supervisor's record."""
    address = resolve_bus_address(paths)
    try:
        bus = open_bus(address)
    except Exception:  # no system bus and no private bus
        fail(NOT_RUNNING, EXIT_NOT_ALL_RUNNING)
    from ctl.supervisor import SupervisorState

    supervised = SupervisorState.read(paths)
    answers = await asyncio.gather(*(_query(info, bus) for info in DAEMONS))
    rows: list[dict[str, Any]] = []
    for info, answer in zip(DAEMONS, answers, strict=True):
        if isinstance(answer, DaemonStatus):
            row = to_builtins(answer)
            row["uptime"] = _uptime(answer.started_at_usec)
        else:
            row = {
                "name": info.name,
                "state": answer,
                "version": "",
                "pid": 0,
                "supervisor": "",
                "metrics_url": "",
                "uptime": "",
                "detail": "",
            }
            record = supervised.daemons.get(info.name) if supervised else None
            if record is not None:
                row["supervisor"] = "zlayerctl"
                row["state"] = record.state
                if record.last_exit is not None:
                    row["detail"] = f"last exit code {record.last_exit}, {record.restarts} restarts"
        row["unit"] = info.unit
        rows.append(row)
    bus.close()
    return rows


_STATE_STYLE = {"running": "green", "starting": "yellow", "restarting": "yellow"}


@click.command()
@format_option
def status(output_format: str) -> None:
    """Show each daemon's state, version, pid and supervisor."""
    rows = asyncio.run(collect(Paths.from_env()))
    if all(row["state"] == "not running" for row in rows):
        fail(NOT_RUNNING, EXIT_NOT_ALL_RUNNING)
    if output_format == "json":
        print_json(rows)
    else:
        print_table(
            ["DAEMON", "STATE", "VERSION", "PID", "UPTIME", "SUPERVISOR", "METRICS", "DETAIL"],
            [
                [
                    f"zlayer-{r['name']}",
                    f"[{_STATE_STYLE.get(r['state'], 'red')}]{r['state']}[/]",
                    r["version"],
                    r["pid"] or "",
                    r["uptime"],
                    r["supervisor"],
                    r["metrics_url"],
                    r["detail"],
                ]
                for r in rows
            ],
        )
    if any(r["state"] != "running" for r in rows):
        raise SystemExit(EXIT_NOT_ALL_RUNNING)
