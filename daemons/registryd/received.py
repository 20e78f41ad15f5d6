"""Files and directories a client sends registryd because registryd cannot see them.

Under systemd, registryd's unit gives it a private /tmp and no /home, so a
build context in a user's home or an archive in /tmp is out of its reach by
path. ``Registry1.PathVisible`` tells zlayerctl whether a path names the
same file for registryd (device and inode compared); where it does not,
zlayerctl streams the file or directory as a tar through a pipe
(``Registry1.Receive``) and uses the path this module hands back instead.

Received entries live under ``received/`` in registryd's state directory,
one directory each. They are removed when the call or job that used them
ends (:meth:`ReceivedFiles.release`), when a client received but never used
them within :data:`UNUSED_TTL_SEC`, and all at once when registryd starts.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO, cast

from shared.bus import SEND_COMPLETE, InvalidArgumentError, UnavailableError

log = logging.getLogger("zlayer.registryd.received")

UNUSED_TTL_SEC = 3600.0  # received but never used: the client died between the two calls


class _TailReader:
    """A file's reads, remembering the last bytes read: tarfile reads ahead in
    records, so the mark after the archive may already be in its buffer."""

    KEEP = 64 * 1024  # more than a tar record (10 KiB) of zero padding plus the mark

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.tail = (self.tail + data)[-self.KEEP :]
        return data


def _member_filter(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
    """tarfile's "tar" filter (nothing written outside the entry, no set-id bits), and
    no devices or named pipes. Symbolic links stay as they are, absolute ones too:
    a project's links (a virtualenv's python, say) are the project's to copy."""
    if member.ischr() or member.isblk() or member.isfifo():
        raise tarfile.SpecialFileError(member)
    if member.islnk():
        target = os.path.realpath(os.path.join(destination, member.linkname))
        if os.path.commonpath([target, os.path.realpath(destination)]) != os.path.realpath(
            destination
        ):
            raise tarfile.LinkOutsideDestinationError(member, target)
    return tarfile.tar_filter(member, destination)


class ReceivedFiles:
    """The ``received/`` directory: what clients streamed to registryd."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._in_use: set[str] = set()  # entry names a call or job is using: never swept

    def reset(self) -> None:
        """Drop everything received before this start: no call can still use it."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @staticmethod
    def visible(path: str, device: int, inode: int) -> bool:
        """Whether ``path`` is, for this process, the file the caller stat()ed."""
        try:
            found = os.stat(path)
        except OSError:
            return False
        return (found.st_dev, found.st_ino) == (device, inode)

    def receive(self, fd: int) -> str:
        """Unpack the tar stream on ``fd`` (one top-level entry); that entry's path here.

        The stream is read to its end; a broken or hostile archive (names or
        hard links leaving the entry, devices) is refused and nothing of it is kept.
        """
        self._sweep()
        entry = self.root / uuid.uuid4().hex
        entry.mkdir(mode=0o700)
        try:
            with os.fdopen(fd, "rb") as raw:
                stream = _TailReader(raw)
                with tarfile.open(fileobj=cast(BinaryIO, stream), mode="r|") as tar:
                    tar.extractall(entry, filter=_member_filter)
                while stream.read(1 << 16):
                    pass  # to the end: the mark follows the tar's zero blocks
                if not stream.tail.rstrip(b"\0").endswith(SEND_COMPLETE):
                    raise InvalidArgumentError(
                        "the sender stopped before the end (a file it could not read?); "
                        "nothing was kept"
                    )
            tops = os.listdir(entry)
            if len(tops) != 1:
                raise InvalidArgumentError(
                    f"what was sent holds {len(tops)} top-level entries, not one"
                )
        except tarfile.FilterError as exc:
            shutil.rmtree(entry, ignore_errors=True)
            what = (
                "is a device or a named pipe"
                if isinstance(exc, tarfile.SpecialFileError)
                else "points outside what was sent"
                if isinstance(
                    exc, tarfile.LinkOutsideDestinationError | tarfile.OutsideDestinationError
                )
                else f"cannot be taken ({exc})"
            )
            raise InvalidArgumentError(
                f"{exc.tarinfo.name} {what}; move it out of the directory and try again"
            ) from None
        except (tarfile.TarError, EOFError) as exc:
            shutil.rmtree(entry, ignore_errors=True)
            raise InvalidArgumentError(
                f"what was sent is not a complete tar stream ({exc})"
            ) from None
        except OSError as exc:
            shutil.rmtree(entry, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise UnavailableError(
                    f"no space left in {self.root} to receive the files; free some space "
                    "(zlayerctl system prune) and try again"
                ) from None
            raise
        except BaseException:
            shutil.rmtree(entry, ignore_errors=True)
            raise
        received = entry / tops[0]
        log.info("received %s", received)
        return str(received)

    def _entry(self, path: str) -> str | None:
        if not path or not Path(path).is_relative_to(self.root):
            return None
        parts = Path(path).relative_to(self.root).parts
        return parts[0] if parts else None

    def claim(self, *paths: str) -> None:
        """Mark the received entries among ``paths`` as in use until :meth:`release`."""
        for path in paths:
            entry = self._entry(path)
            if entry is not None:
                self._in_use.add(entry)

    def release(self, *paths: str) -> None:
        """Remove the received entries among ``paths``; other paths are left alone."""
        for path in paths:
            entry = self._entry(path)
            if entry is not None:
                self._in_use.discard(entry)
                shutil.rmtree(self.root / entry, ignore_errors=True)

    def _sweep(self) -> None:
        cutoff = time.time() - UNUSED_TTL_SEC
        for entry in self.root.iterdir():
            if entry.name in self._in_use:
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                continue
