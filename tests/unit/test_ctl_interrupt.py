"""``logs -f`` and other follows end at ^C, even when a stream's clean-up stalls."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

PROGRAM = """
import asyncio, sys
from ctl.interrupt import run_following

async def follow(stubborn):
    print("following", flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if not stubborn:
                raise
            print("clean-up stalls", flush=True)  # as a channel that does not close

run_following(follow(sys.argv[1] == "stubborn"), grace=0.5)
print("ended", flush=True)
"""


@pytest.mark.parametrize(("kind", "codes"), [("plain", {0}), ("stubborn", {0, 130})])
def test_sigint_ends_a_follow(kind: str, codes: set[int]) -> None:
    """A stubborn follow ends either way: the interrupt lands in its coroutine (which
    then ends), or in the idle loop, when its clean-up stalls and the process exits 130."""
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, kind], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "following"
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=20)
    assert process.returncode in codes, out
    assert time.monotonic() - started < 10
    if process.returncode == 130:
        assert out.strip().splitlines()[-1:] == ["clean-up stalls"], out
    else:
        assert out.strip().splitlines()[-1:] == ["ended"], out
