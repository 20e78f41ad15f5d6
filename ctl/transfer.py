"""Handing zlayer-registryd a file or directory it cannot see by path.

Under systemd, registryd has its own /tmp and no /home, so a build context
in a home directory or an archive in /tmp is out of its reach. Each path a
command gives registryd goes through :meth:`Sent.path`: when
registryd sees the same file (``Registry1.PathVisible`` compares device and
inode), the path itself is used and nothing is copied; otherwise the file
or directory is streamed to it as a tar through a pipe (``Registry1.Receive``)
and registryd's copy is used, which it removes once the call or job that
used it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tarfile
import threading
from collections.abc import Iterator

from ctl.protocols import PathsApi
from shared.bus import SEND_COMPLETE, ZLayerError


class Sent:
    """What one command sent registryd, and the way back for its messages.

    :meth:`path` is the path registryd should use for one of ours; inside
    :meth:`speaking_our_paths`, an error registryd returns names our paths,
    not its copies.
    """

    def __init__(self, registry: PathsApi) -> None:
        self.registry = registry
        self._theirs: dict[str, str] = {}  # registryd's path -> ours

    async def path(self, path: str) -> str:
        """``path`` (absolute) if registryd sees it as we do, else a copy's path there."""
        theirs = await _path_for_registryd(self.registry, path)
        if theirs != path:
            self._theirs[theirs] = path
        return theirs

    def ours(self, text: str) -> str:
        """``text`` with registryd's copies named by the user's own paths."""
        for theirs, ours in self._theirs.items():
            text = text.replace(theirs, ours)
        return text

    @contextlib.contextmanager
    def speaking_our_paths(self) -> Iterator[None]:
        try:
            yield
        except ZLayerError as exc:
            if not self._theirs or not exc.args:
                raise
            raise type(exc)(self.ours(str(exc.args[0]))) from None


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
            # What a symbolic link names is sent under the link's name: registryd refuses
            # a link as the top entry, since it would read whatever the link points to.
            tar.add(os.path.realpath(path), arcname=os.path.basename(path.rstrip("/")) or "root")
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


async def _path_for_registryd(registry: PathsApi, path: str) -> str:
    try:
        status = os.stat(path)
    except OSError:
        return path  # registryd's own check gives the sentence
    if await registry.path_visible(path, status.st_dev, status.st_ino):
        return path
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []
    stop = threading.Event()
    writer = threading.Thread(target=_write_tar, args=(path, write_fd, failure, stop), daemon=True)
    writer.start()
    try:
        theirs = await registry.receive(read_fd)
    finally:
        stop.set()  # registryd has answered: whatever is still unwritten is not wanted
        try:
            await _drain_until_done(read_fd, writer)
        finally:
            os.close(read_fd)
    if failure:
        # A sentence like registryd's own, so zlayerctl reports both alike.
        raise ZLayerError(f"cannot read {path} to send it to zlayer-registryd: {failure[0]}")
    return theirs
