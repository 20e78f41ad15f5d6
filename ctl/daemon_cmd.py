"""``zlayerctl daemon run|stop``: the daemons without systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import click

from ctl.output import err_console, fail
from ctl.supervisor import Supervisor, SupervisorState, find_executable
from shared.logs import setup_logging
from shared.paths import Paths
from shared.proc import alive

DETACH_READY_TIMEOUT = 60.0
STOP_WAIT = 30.0


@click.group()
def daemon() -> None:
    """Run the six daemons under zlayerctl's own supervisor (hosts without systemd)."""


def _announce(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    err_console.print(f"[dim]{stamp}[/] {message}", highlight=False)


@daemon.command("run")
@click.option("--detach", "-d", is_flag=True, help="run in the background and return once ready")
def run(detach: bool) -> None:
    """Start a private bus and the six daemons; Ctrl-C or SIGTERM stops them all."""
    paths = Paths.from_env()
    existing = SupervisorState.read(paths)
    if existing is not None:
        fail(
            f"ZLayer is already running under zlayerctl (supervisor pid {existing.pid}); "
            "`zlayerctl daemon stop` ends it"
        )
    if detach:
        _run_detached(paths)
        return
    setup_logging("zlayerctl")

    def on_ready() -> None:
        _announce(
            f"[green]six daemons ready[/] on {paths.bus_socket} (logs in {paths.log_dir}); "
            "Ctrl-C stops them"
        )

    supervisor = Supervisor(paths, announce=_announce)
    code = asyncio.run(supervisor.run(on_ready))
    _announce("stopped")
    sys.exit(code)


def _run_detached(paths: Paths) -> None:
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = paths.log_dir / "supervisor.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [find_executable("zlayerctl"), "daemon", "run"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    deadline = time.monotonic() + DETACH_READY_TIMEOUT
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            fail(
                f"the supervisor exited with code {code} before the daemons were ready; "
                f"see {log_path}"
            )
        state = SupervisorState.read(paths)
        if state is not None and state.pid == process.pid and state.ready:
            err_console.print(
                f"ZLayer is running in the background (supervisor pid {process.pid}); "
                "`zlayerctl status` shows the daemons, `zlayerctl daemon stop` ends them",
                highlight=False,
            )
            return
        time.sleep(0.05)
    fail(
        f"the daemons were not ready after {DETACH_READY_TIMEOUT:.0f}s; they keep trying "
        f"in the background (supervisor pid {process.pid}); see {paths.log_dir}"
    )


@daemon.command("stop")
def stop() -> None:
    """Stop the daemons started by `zlayerctl daemon run --detach`."""
    paths = Paths.from_env()
    state = SupervisorState.read(paths)
    if state is None:
        fail(
            "no ZLayer supervisor is running here; on a systemd host use "
            "`systemctl stop zlayer.target`"
        )
        return
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile: stopped below
        os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        if not alive(state.pid):
            err_console.print("ZLayer stopped", highlight=False)
            return
        time.sleep(0.05)
    fail(f"the supervisor (pid {state.pid}) did not stop within {STOP_WAIT:.0f}s")
