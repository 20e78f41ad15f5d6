"""A process that has exited is not alive, even while it is a zombie its parent has not
reaped yet: ``zlayerctl daemon stop`` waits on this for the supervisor (a program that runs
the supervisor in the foreground and reaps it only after ``daemon stop`` returns made it
wait its whole STOP_WAIT), agentd for conmon, overlayd for wireguard-go."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from shared.proc import alive


def _state(pid: int) -> str:  # as /proc says, to find the zombie
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_a_running_process_is_alive_an_exited_one_is_not_even_unreaped() -> None:
    running = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])
    try:
        assert alive(running.pid)
        deadline = time.monotonic() + 10
        while _state(ended.pid) != "Z":  # exited, not reaped: os.kill(pid, 0) still succeeds
            assert time.monotonic() < deadline, "true did not end"
            time.sleep(0.01)
        assert not alive(ended.pid)
    finally:
        running.kill()
        running.wait()
        ended.wait()
    assert not alive(ended.pid)  # reaped: no such process
