"""Handing zlayer-registryd a file or directory it cannot see by path.

Under systemd, registryd has its own /tmp and no /home, so a build context
in a home directory or an archive in /tmp is out of its reach. Each path a
command gives registryd goes through :func:`path_for_registryd`: when
registryd sees the same file (``Registry1.PathVisible`` compares device and
inode), the path itself is used and nothing is copied; otherwise the file
or directory is streamed to it as a tar through a pipe (``Registry1.Receive``)
and registryd's copy is used, which it removes once the call or job that
used it ends.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import threading
from typing import Any

from shared.bus import SEND_COMPLETE, ZLayerError


class SendError(Exception):
    """The file or directory could not be read to be sent."""


class Sent:
    """Paths as registryd knows them, and the way back for its messages."""

    def __init__(self) -> None:
        self._theirs: dict[str, str] = {}  # registryd's path -> ours

    def record(self, ours: str, theirs: str) -> None:
        if ours != theirs:
            self._theirs[theirs] = ours

    def ours(self, text: str) -> str:
        """``text`` with registryd's copies named by the user's own paths."""
        for theirs, ours in self._theirs.items():
            text = text.replace(theirs, ours)
        return text

    def error(self, exc: ZLayerError) -> ZLayerError:
        """The same error with the user's paths in its sentence."""
        if not self._theirs or not exc.args:
            return exc
        renamed = type(exc)(self.ours(str(exc.args[0])))
        return renamed


class _Stopped(Exception):
    """The reader is gone: stop writing."""


class _PipeWriter:
    """The pipe's write end for tarfile, giving up once ``stop`` is set."""

    def __init__(self, fd: int, stop: threading.Event) -> None:
        self.fd = fd
        self.stop = stop

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.stop.is_set():
                raise _Stopped
            view = view[os.write(self.fd, view) :]
        return len(data)


def _write_tar(
    path: str, write_fd: int, failure: list[BaseException], stop: threading.Event
) -> None:
    pipe = _PipeWriter(write_fd, stop)
    try:
        with tarfile.open(fileobj=pipe, mode="w|") as tar:  # type: ignore[call-overload]
            tar.add(path, arcname=os.path.basename(path.rstrip("/")) or "root")
        # Only a stream read to its end carries this: registryd keeps nothing
        # of one cut short by a file we could not read.
        pipe.write(SEND_COMPLETE)
    except (BrokenPipeError, _Stopped):
        pass  # registryd stopped reading; its reply says why
    except OSError as exc:
        failure.append(exc)
    finally:
        os.close(write_fd)


async def _drain_until_done(read_fd: int, writer: threading.Thread) -> None:
    """Let a writer registryd stopped reading from see ``stop`` and end.

    The bus message that carried the pipe may still hold a duplicate of the
    read end in this process, so closing ours would not wake a writer
    blocked on a full pipe; reading a little does.
    """
    os.set_blocking(read_fd, False)
    while writer.is_alive():
        try:
            if not os.read(read_fd, 1 << 16):
                break
        except BlockingIOError:
            await asyncio.sleep(0.01)
    await asyncio.to_thread(writer.join)


async def path_for_registryd(registryd: Any, path: str, sent: Sent) -> str:
    """``path`` (absolute) if registryd sees it as we do, else the path of a copy sent to it."""
    try:
        status = os.stat(path)
    except OSError:
        return path  # registryd's own check gives the sentence
    if await registryd.path_visible(path, status.st_dev, status.st_ino):
        return path
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []
    stop = threading.Event()
    writer = threading.Thread(target=_write_tar, args=(path, write_fd, failure, stop), daemon=True)
    writer.start()
    try:
        theirs: str = await registryd.receive(read_fd)
    finally:
        stop.set()  # registryd has answered: whatever is still unwritten is not wanted
        try:
            await _drain_until_done(read_fd, writer)
        finally:
            os.close(read_fd)
    if failure:
        raise SendError(f"cannot read {path} to send it to zlayer-registryd: {failure[0]}")
    sent.record(path, theirs)
    return theirs
