"""zlayerctl's end after a command run without click (ctl.main._end_now): what the
interpreter's shutdown does that anyone sees still happens, the rest is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_output_and_atexit_handlers_are_not_lost_and_the_exit_is_0() -> None:
    result = run(
        "import atexit, sys\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "sys.stdout.write('x' * 100000)\n"  # still in the buffer: a pipe is no terminal
        "sys.stderr.write('said')\n"
        "from ctl.main import _end_now\n"
        "_end_now()\n"
        "print('not reached')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "x" * 100000 + "handler ran\n"
    assert result.stderr == "said"


def test_it_does_not_end_the_process_while_another_thread_runs() -> None:
    result = run(
        "import threading\n"
        "done = threading.Event()\n"
        "worker = threading.Thread(target=lambda: (done.wait(5), print('worker ended')))\n"
        "worker.start()\n"
        "from ctl.main import _end_now\n"
        "_end_now()\n"
        "print('went on')\n"
        "done.set()\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["went on", "worker ended"]
