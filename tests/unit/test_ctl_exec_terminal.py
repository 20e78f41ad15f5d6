"""``zlayerctl exec -t`` hands its terminal over set as the runtime sets it, from before the
call: keys typed meanwhile are kept (not flushed) and given at once, the terminal echoes
nothing more, ^C still stops zlayerctl, its own lines still end as a terminal shows them,
and the terminal is as it was afterwards."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import time

CHILD = r"""
import os, sys, termios, time
from ctl.replica_cmd import _handed_over

before = termios.tcgetattr(0)
time.sleep(0.3)  # the keys below are typed meanwhile, before the hand-over
with _handed_over(True):
    mode = termios.tcgetattr(0)
    print("lflag", mode[3] & (termios.ECHO | termios.ICANON | termios.ISIG))
    print("quit", mode[6][termios.VQUIT] == b"\0", "intr", mode[6][termios.VINTR] == b"\x03")
    print("read", os.read(0, 100))
print("restored", termios.tcgetattr(0) == before)
"""


def test_the_terminal_is_handed_over_raw_keeping_what_was_typed_and_restored_after() -> None:
    master, slave = os.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    try:
        os.write(master, b"ls")  # typed ahead, no Enter: a cooked terminal would hold it
        output = b""
        deadline = time.monotonic() + 20
        while b"restored" not in output or not output.endswith(b"\n"):
            assert time.monotonic() < deadline, output
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                output += os.read(master, 4096)
        assert child.wait(timeout=10) == 0, output
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
    # echoed once by the terminal, still cooked when they were typed; then zlayerctl's lines,
    # still ending in CR LF (OPOST kept)
    assert output.startswith(b"ls") and output.count(b"ls") == 2, output
    lines = output[2:].decode().split("\r\n")
    assert f"lflag {termios.ISIG}" in lines, output  # no echo, no line editing, ^C kept
    assert "quit True intr True" in lines, output
    assert "read b'ls'" in lines, output  # kept, and given at once, not held for a line
    assert "restored True" in lines, output
