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


def _write_tar(path: str, write_fd: int, failure: list[BaseException]) -> None:
    try:
        with os.fdopen(write_fd, "wb") as pipe:
            with tarfile.open(fileobj=pipe, mode="w|") as tar:
                tar.add(path, arcname=os.path.basename(path.rstrip("/")) or "root")
            # Only a stream read to its end carries this: registryd keeps nothing
            # of one cut short by a file we could not read.
            pipe.write(SEND_COMPLETE)
    except BrokenPipeError:
        pass  # registryd stopped reading; its reply says why
    except OSError as exc:
        failure.append(exc)


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
    writer = threading.Thread(target=_write_tar, args=(path, write_fd, failure), daemon=True)
    writer.start()
    try:
        theirs: str = await registryd.receive(read_fd)
    finally:
        os.close(read_fd)  # the bus sent a duplicate
        # A refused stream leaves the writer blocked on a full pipe no more:
        # closing our read end makes its next write fail with EPIPE.
        await asyncio.to_thread(writer.join)
    if failure:
        raise SendError(f"cannot read {path} to send it to zlayer-registryd: {failure[0]}")
    sent.record(path, theirs)
    return theirs
