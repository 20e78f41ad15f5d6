"""``zlayerctl status``: each daemon's state, version, pid and supervisor.

The body, :func:`show`, imports neither click nor sdbus: ``ctl.main`` runs
it straight from a command line ``ctl.readargs`` understands. The click
command ``status`` (for ``--help`` and usage errors) is made on first
access, through the module's ``__getattr__``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ctl.errors import NOT_RUNNING
from ctl.output import fail, print_json, print_table
from shared.busread import BUS_NAMES, BusReader, NoBusError, bus_address
from shared.wire import to_builtins
from shared.wire.daemon import DaemonStatus

if TYPE_CHECKING:
    import click

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


def _answers() -> dict[str, DaemonStatus | str]:
    """Each daemon's Status, or "not answering" / "not running", asked all at once."""
    try:
        bus = BusReader(bus_address())
    except NoBusError:  # no system bus and no private bus
        fail(NOT_RUNNING, EXIT_NOT_ALL_RUNNING)
    with bus:
        try:
            found = bus.statuses(list(BUS_NAMES), CALL_TIMEOUT)
        except NoBusError:
            return dict.fromkeys(BUS_NAMES, "not running")
    return {
        name: answer
        if isinstance(answer, DaemonStatus)
        else ("not answering" if answer is None else "not running")
        for name, answer in found.items()
    }


def not_answering(name: str, state: str) -> dict[str, Any]:
    """The row of a daemon that gave no Status: ``state`` says why."""
    return {
        "name": name,
        "state": state,
        "version": "",
        "pid": 0,
        "supervisor": "",
        "metrics_url": "",
        "uptime": "",
        "detail": "",
        "unit": f"zlayer-{name}.service",
    }


def answered(status: DaemonStatus) -> dict[str, Any]:
    """The row of a daemon from its Status."""
    row: dict[str, Any] = to_builtins(status)
    row["uptime"] = _uptime(status.started_at_usec)
    row["unit"] = f"zlayer-{status.name}.service"
    return row


def collect() -> list[dict[str, Any]]:
    """One row per daemon, from the bus and the supervisor's record."""
    answers = _answers()
    from ctl.supervisor_state import SupervisorState, state_file

    supervised = SupervisorState.read_file(state_file())
    rows: list[dict[str, Any]] = []
    for name, answer in answers.items():
        if isinstance(answer, DaemonStatus):
            rows.append(answered(answer))
            continue
        row = not_answering(name, answer)
        record = supervised.daemons.get(name) if supervised else None
        if record is not None:
            row["supervisor"] = "zlayerctl"
            row["state"] = record.state
            if record.last_exit is not None:
                row["detail"] = f"last exit code {record.last_exit}, {record.restarts} restarts"
        rows.append(row)
    return rows


_STATE_STYLE = {"running": "green", "starting": "yellow", "restarting": "yellow"}


def print_status(rows: list[dict[str, Any]], output_format: str) -> None:
    """Print the rows; exit 3 unless every daemon runs (as ``systemctl status``)."""
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


def show(output_format: str) -> None:
    """Show each daemon's state, version, pid and supervisor."""
    rows = collect()
    if all(row["state"] == "not running" for row in rows):
        fail(NOT_RUNNING, EXIT_NOT_ALL_RUNNING)
    print_status(rows, output_format)


def _command() -> click.Command:
    import click

    from ctl.output import format_option

    @click.command()
    @format_option
    def status(output_format: str) -> None:
        """Show each daemon's state, version, pid and supervisor."""
        show(output_format)

    return status


_made: dict[str, click.Command] = {}


def __getattr__(name: str) -> Any:
    if name == "status":
        if name not in _made:
            _made[name] = _command()
        return _made[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
