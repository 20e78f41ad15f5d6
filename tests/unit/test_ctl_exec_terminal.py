"""``zlayerctl exec -t`` sets its terminal raw from before the call, on a real pty: keys typed
meanwhile are kept (not flushed) and given at once, the terminal echoes nothing more, and
the terminal is as it was afterwards. Handed to the runtime (a replica on this node), ^C
still stops zlayerctl and its own lines still end as a terminal shows them; for a replica
on another node every key, ^C included, goes to the command and output is not translated."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import time

CHILD = r"""
import os, sys, termios, time
from ctl.replica_cmd import _raw_terminal

before = termios.tcgetattr(0)
time.sleep(0.3)  # the keys below are typed meanwhile, before the hand-over
with _raw_terminal(True, keep_interrupt=sys.argv[1] == "keep"):
    mode = termios.tcgetattr(0)
    print("lflag", mode[3] & (termios.ECHO | termios.ICANON | termios.ISIG))
    print("quit", mode[6][termios.VQUIT] == b"\0", "intr", mode[6][termios.VINTR] == b"\x03")
    print("read", os.read(0, 100))
print("restored", termios.tcgetattr(0) == before)
"""


def _typed_ahead_then_raw(keep_interrupt: bool) -> bytes:
    """What the pty showed: "ls" typed before the child sets it raw, then the child's lines."""
    master, slave = os.openpty()
    argv = [sys.executable, "-c", CHILD, "keep" if keep_interrupt else "all"]
    child = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
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
    return output


def test_handed_to_the_runtime_raw_keeping_what_was_typed_and_interrupt_and_restored() -> None:
    output = _typed_ahead_then_raw(keep_interrupt=True)
    # echoed once by the terminal, still cooked when they were typed; then zlayerctl's lines,
    # still ending in CR LF (OPOST kept)
    assert output.startswith(b"ls") and output.count(b"ls") == 2, output
    lines = output[2:].decode().split("\r\n")
    assert f"lflag {termios.ISIG}" in lines, output  # no echo, no line editing, ^C kept
    assert "quit True intr True" in lines, output
    assert "read b'ls'" in lines, output  # kept, and given at once, not held for a line
    assert "restored True" in lines, output


def test_for_another_node_fully_raw_keeping_what_was_typed_and_restored() -> None:
    output = _typed_ahead_then_raw(keep_interrupt=False)
    assert output.startswith(b"lslflag"), output  # echoed once, while still cooked
    # inside, output is not translated (OPOST off): lines end in a bare LF
    inside, _, after = output[2:].partition(b"restored")
    lines = inside.decode().split("\n")
    assert "lflag 0" in lines, output  # no echo, no line editing, ^C goes to the command
    assert "quit False intr True" in lines, output  # the signal keys are left as they were
    assert "read b'ls'" in lines, output
    assert b"\r\n" not in inside, output
    assert after.startswith(b" True"), output
