"""``zlayerctl daemon stop`` counts a supervisor that has exited as stopped, even while it
is a zombie its parent has not reaped yet (a program that runs the supervisor in the
foreground and reaps it only after ``daemon stop`` returns would otherwise wait the whole
STOP_WAIT)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ctl.daemon_cmd import _alive


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_a_running_process_is_alive_an_exited_one_is_not_even_unreaped() -> None:
    running = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])
    try:
        assert _alive(running.pid)
        deadline = time.monotonic() + 10
        while _state(ended.pid) != "Z":  # exited, not reaped: os.kill(pid, 0) still succeeds
            assert time.monotonic() < deadline, "true did not end"
            time.sleep(0.01)
        assert not _alive(ended.pid)
    finally:
        running.kill()
        running.wait()
        ended.wait()
    assert not _alive(ended.pid)  # reaped: no such process
