"""Shared by the benchmarks: the six daemons under a throwaway prefix, plus stats.

:func:`running_daemons` starts ``zlayerctl daemon run --detach`` under a fresh
temporary ``ZLAYER_PREFIX`` whose configuration gives every daemon free ports
(as ``tests/conftest.py`` does), so a benchmark never clashes with a running
installation. On the way out, normally, on an error, on Ctrl-C or SIGTERM,
it runs ``zlayerctl daemon stop``, kills by PID whatever the supervisor's
state file named if that did not work (and, last, any process carrying this
run's own temporary prefix in its environment), and removes the prefix.

This module measures nothing itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil

from ctl.supervisor import SupervisorState, find_executable
from shared.bus import BUS_ADDRESS_ENV, DAEMONS
from shared.paths import PREFIX_ENV, Paths

START_TIMEOUT = 90.0
STOP_TIMEOUT = 40.0
STATE_WAIT = 10.0


@dataclass(frozen=True)
class Cluster:
    """The six daemons as one benchmark sees them."""

    paths: Paths
    state: SupervisorState
    env: dict[str, str]

    @property
    def bus_address(self) -> str:
        return self.state.bus_address

    def zlayerctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run zlayerctl against this prefix and return what it printed."""
        return subprocess.run(
            [find_executable("zlayerctl"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def write_bench_config(paths: Paths, extra: Mapping[str, str] | None = None) -> None:
    """Free ports for every daemon; the same settings as ``tests/conftest.py``.

    ``extra`` maps a daemon's name to more TOML lines for its file.
    """
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    for info in DAEMONS:
        more = "http_port = 0\n" if info.name == "apid" else ""
        given = (extra or {}).get(info.name, "")
        if info.name == "overlayd" and "bridge" not in given:
            # A network of the benchmark's own, never the node's zlayer0.
            pid = os.getpid()
            more += f'bridge = "zlq{pid % 100000}"\nsubnet = "10.248.{pid % 250}.0/24"\n'
        more += given
        paths.daemon_config(info.name).write_text(f"metrics_port = 0\n{more}")


def _sigterm_to_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _processes(state: SupervisorState | None) -> list[psutil.Process]:
    """The supervisor, its bus and its daemons, pinned by PID and start time."""
    if state is None:
        return []
    pids = [state.pid, state.bus_pid, *(c.pid for c in state.daemons.values())]
    found = []
    for pid in pids:
        if pid <= 0:
            continue
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def _started_by_us(prefix: Path) -> list[psutil.Process]:
    """Processes carrying ``ZLAYER_PREFIX=<our temporary prefix>``: ours alone."""
    wanted = f"{PREFIX_ENV}={prefix}".encode()
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{process.pid}/environ", "rb") as handle:
                if wanted in handle.read().split(b"\0"):
                    found.append(process)
        except OSError:
            continue
    return found


def _stop(paths: Paths, env: dict[str, str], known: SupervisorState | None) -> None:
    state = SupervisorState.read(paths) or known
    if state is None and (paths.log_dir / "supervisor.log").exists():
        # Interrupted while starting: the supervisor may not have written its state yet.
        deadline = time.monotonic() + STATE_WAIT
        while state is None and time.monotonic() < deadline:
            time.sleep(0.1)
            state = SupervisorState.read(paths)
    # Pin every PID now: once stopped, the state file is gone.
    pinned = _processes(state)
    if state is not None:
        try:
            subprocess.run(
                [find_executable("zlayerctl"), "daemon", "stop"],
                env=env,
                capture_output=True,
                timeout=STOP_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"zlayerctl daemon stop failed: {exc}", file=sys.stderr)
    # psutil checks the start time too, so a reused PID is never hit.
    left = [p for p in pinned if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for process in left:
        print(f"killing leftover pid {process.pid}", file=sys.stderr)
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=5)
    # Last resort, e.g. a supervisor that never wrote its state: whatever still
    # runs with our own temporary prefix in its environment.
    stray = _started_by_us(paths.prefix)
    for process in stray:
        print(f"killing stray pid {process.pid}", file=sys.stderr)
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stray, timeout=5)


@contextlib.contextmanager
def running_daemons(
    config: Mapping[str, str] | None = None,
    after_stop: Callable[[Paths, dict[str, str]], None] | None = None,
) -> Iterator[Cluster]:
    """The six daemons ready on a private bus under a fresh prefix; always cleaned up.

    ``config`` adds TOML lines to daemons' files (by daemon name);
    ``after_stop(paths, env)`` runs once the daemons are stopped, before the
    prefix is removed, with Ctrl-C and SIGTERM ignored.
    """
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    # A Unix socket path must fit in 108 bytes, so keep the prefix short.
    prefix = Path(tempfile.mkdtemp(prefix="zlbench-", dir="/tmp"))
    paths = Paths(prefix)
    env = {k: v for k, v in os.environ.items() if k != BUS_ADDRESS_ENV}
    env[PREFIX_ENV] = str(prefix)
    state: SupervisorState | None = None
    try:
        write_bench_config(paths, config)
        started = time.monotonic()
        result = subprocess.run(
            [find_executable("zlayerctl"), "daemon", "run", "--detach"],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        state = SupervisorState.read(paths)
        if result.returncode != 0 or state is None or not state.ready:
            raise RuntimeError(
                f"zlayerctl daemon run --detach failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            )
        print(
            f"six daemons ready in {time.monotonic() - started:.2f}s "
            f"(supervisor pid {state.pid}, bus {state.bus_address})",
            file=sys.stderr,
        )
        yield Cluster(paths, state, env)
    finally:
        # Ignore a second Ctrl-C or SIGTERM while tearing down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            _stop(paths, env, state)
            # The bridge, nft table and addresses overlayd made for this prefix.
            subprocess.run(
                [find_executable("zlayer-overlayd"), "--remove-network"],
                env=env,
                capture_output=True,
                timeout=STOP_TIMEOUT,
                check=False,
            )
            if after_stop is not None:
                try:
                    after_stop(paths, env)
                except Exception as exc:  # cleanup goes on; say what was left
                    print(f"cleanup after stop failed: {exc}", file=sys.stderr)
            shutil.rmtree(prefix, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- statistics


def timed_calls(work: Callable[[], object], runs: int) -> list[float]:
    """Milliseconds each of ``runs`` calls of ``work`` took."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest-rank on the sorted samples."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(len(ordered) * q / 100))
    return ordered[rank - 1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain aligned table: the first column left, the rest right."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [str(first).ljust(widths[0])]
        parts += [str(c).rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts)

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
