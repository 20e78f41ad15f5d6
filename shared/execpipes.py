"""A command run in a replica by agentd (``Agent1.Exec``) with pipes of ours, or a terminal.

agentd takes file descriptors over the bus; a caller that relays the command
somewhere else (apid's exec WebSocket, another node's ``Node1.Exec``) hands it
pipes and moves bytes through them. With a terminal the runtime wants one as
its stdin (it sets it raw) and relays the command's terminal to its stdout:
a pty's far end is the command's stdin and the caller writes to the near end;
the output still comes through a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
import tty as ttys
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Literal, Protocol

from shared.bus import UnavailableError

READ_CHUNK = 64 * 1024
DRAIN_AFTER_EXIT = 2.0  # a background child may keep the output open after the command ends
MAX_TERMINAL_SIDE = 65535  # a terminal's columns and rows are unsigned shorts

Stream = Literal["stdout", "stderr"]


class Execs(Protocol):
    """What of agentd's client an exec needs (``shared.clients.AgentClient``)."""

    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int: ...


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def set_size(terminal: int, cols: int, rows: int) -> None:
    """The terminal's size as the command sees it (``stty size``, $COLUMNS, SIGWINCH)."""
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def pipe_writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", buffering=0)
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def chunks(fd: int) -> AsyncGenerator[bytes, None]:
    """What can be read from the pipe ``fd`` as it comes, to its end."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                readable.clear()
                await readable.wait()
                continue
            if not chunk:
                return
            yield chunk
    finally:
        loop.remove_reader(fd)


class PipedExec:
    """One command in a replica: write its stdin, read its output, wait for its exit code.

    Our write ends of the output pipes stay open until agentd answers, so an
    output the command's own children keep open does not end the reading
    early; after the answer they close and what is left is read for
    :data:`DRAIN_AFTER_EXIT` at most. :meth:`close` always: it ends the call
    and closes every descriptor (a command still writing gets EPIPE).
    """

    def __init__(self) -> None:
        self.call: asyncio.Future[int] | None = None
        self.terminal: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ours: list[int] = []  # the command's ends, closed once agentd answered
        self._readers: dict[int, Stream] = {}
        self._queue: asyncio.Queue[tuple[Stream, bytes] | None] = asyncio.Queue(maxsize=64)
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(
        cls,
        agent: Execs,
        replica: str,
        command: list[str],
        *,
        tty: bool = False,
        cols: int = 0,
        rows: int = 0,
        merge: bool = False,
    ) -> PipedExec:
        """The command started; ``merge``: its stderr is its stdout's pipe (one stream)."""
        self = cls()
        try:
            if tty:
                stdin_w, stdin_r = os.openpty()
                self.terminal = stdin_w
                try:
                    # Raw from the start, as the runtime sets it once it runs: what is
                    # typed before then is neither echoed a second time nor held for a
                    # whole line, and ^C reaches the command as the byte a terminal sends.
                    ttys.setraw(stdin_r, termios.TCSANOW)
                except termios.error as exc:
                    close_fds([stdin_w, stdin_r])
                    raise OSError(exc.args[0], exc.args[-1]) from None
                if cols and rows:
                    set_size(stdin_w, cols, rows)
            else:
                stdin_r, stdin_w = os.pipe()
            out_r, out_w = os.pipe()
            if merge or tty:
                err_r, err_w = -1, out_w
            else:
                err_r, err_w = os.pipe()
        except OSError as exc:
            raise UnavailableError(
                f"cannot open {'a terminal' if tty else 'pipes'} for the command "
                f"({exc.strerror}); try again{' without a terminal' if tty else ''}"
            ) from None
        self._ours = [stdin_r, out_w] + ([err_w] if err_w != out_w else [])
        self._readers = {out_r: "stdout"}
        if err_r >= 0:
            self._readers[err_r] = "stderr"
        self._writer = await pipe_writer(stdin_w)
        self.call = asyncio.ensure_future(agent.exec(replica, command, tty, stdin_r, out_w, err_w))
        self._tasks = [asyncio.create_task(self._read(fd, s)) for fd, s in self._readers.items()]
        return self

    async def _read(self, fd: int, stream: Stream) -> None:
        with contextlib.suppress(OSError):  # a pipe that broke has ended too
            async with contextlib.aclosing(chunks(fd)) as found:
                async for chunk in found:
                    await self._queue.put((stream, chunk))
        await self._queue.put(None)

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """(stream, bytes) as the command writes them, until every output pipe ended."""
        open_pipes = len(self._readers)
        while open_pipes:
            item = await self._queue.get()
            if item is None:
                open_pipes -= 1
                continue
            yield item

    async def write(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            return
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the command closed its stdin or ended

    def end_input(self) -> None:
        """The command's stdin at its end. Not a terminal's: closing it would hang the
        terminal up (a terminal's end of input is a ^D the caller types)."""
        if self.terminal is None:
            self.hang_up()

    def hang_up(self) -> None:
        """The caller is gone: stdin at its end, a terminal hung up."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()

    def resize(self, cols: int, rows: int) -> None:
        sides_fit = 1 <= cols <= MAX_TERMINAL_SIDE and 1 <= rows <= MAX_TERMINAL_SIDE
        if self.terminal is not None and sides_fit:
            with contextlib.suppress(OSError):
                set_size(self.terminal, cols, rows)

    async def exit_code(self) -> int:
        """agentd's answer (the command's exit code); then our ends of the pipes close."""
        assert self.call is not None
        try:
            return await self.call
        finally:
            close_fds(self._ours)
            self._ours = []

    async def close(self) -> None:
        if self.call is not None and not self.call.done():
            self.call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(
            *self._tasks, *([self.call] if self.call else []), return_exceptions=True
        )
        if self._writer is not None:
            self._writer.close()
        close_fds([*self._ours, *self._readers])
        self._ours, self._readers = [], {}
