"""shared.execpipes.PipedExec hands the runtime a terminal that is raw from the start: what
is typed before the runtime takes it over is not echoed a second time, not held for a whole
line, and ^C reaches the command as its byte instead of being dropped.

The runtime's side is what agentd does with the descriptors it is handed; here, the
receiving end of the call reads the terminal's modes and what a keystroke gives.
"""

from __future__ import annotations

import asyncio
import os
import select
import termios

from shared.execpipes import PipedExec


class TerminalReader:
    """Agent1.Exec's receiving end: how the command's stdin is set, and what it reads."""

    def __init__(self) -> None:
        self.local_modes = 0
        self.read: bytes = b""

    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int:
        self.local_modes = termios.tcgetattr(stdin)[3]
        ready, _, _ = await asyncio.to_thread(select.select, [stdin], [], [], 5.0)
        if ready:
            self.read = os.read(stdin, 64)
        os.write(stdout, b"done")
        return 0


def test_the_terminal_is_raw_before_the_runtime_sets_it() -> None:
    reader = TerminalReader()

    async def scenario() -> int:
        run = await PipedExec.start(reader, "web-1", ["sh"], tty=True, cols=80, rows=24)
        try:
            await run.write(b"\x03")  # ^C, with no newline after it
            return await run.exit_code()
        finally:
            await run.close()

    assert asyncio.run(scenario()) == 0
    assert not reader.local_modes & (termios.ECHO | termios.ICANON | termios.ISIG)
    assert reader.read == b"\x03"
