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

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
import tarfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from daemons.registryd.unpack import STORE_ERRNOS, BoundedTarInfo
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


class RefusedMember(Exception):
    """A member of the stream registryd will not write; the sentence says why."""


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _shown(name: str) -> str:
    """A member's name for a sentence: quoted when it is empty or holds control characters."""
    return name if name and name.isprintable() and name.strip() == name else repr(name)


def _check_member(member: tarfile.TarInfo, root: str) -> tuple[str, str]:
    """Where ``member`` goes under ``root``, and the real path a hard link links to ("" for
    other members); RefusedMember if either leaves ``root`` or the member is a device.

    Checked here rather than with tarfile's extraction filters, which the
    Python 3.11 that Debian 12 ships predates. Every name is taken apart
    as the kernel will resolve it: no absolute names, no ``..`` at all (a
    link extracted earlier would make a lexical check of ``a/../b`` wrong),
    nothing that is ``root`` itself, and the real path of the member's
    parent (links already extracted followed) inside ``root``. Symbolic
    links stay as they are, absolute ones too: a project's links (a
    virtualenv's python, say) are the project's to copy; what matters is
    that nothing is written through one, which the parent's real path and
    :func:`_extract` (a link in the member's own place is removed first)
    see to. A hard link's target must be inside ``root`` once resolved.
    """
    linked = ""
    name = member.name
    shown = _shown(name)
    if member.ischr() or member.isblk() or member.isfifo():
        raise RefusedMember(f"{shown} is a device or a named pipe")
    if "\0" in name or "\0" in member.linkname:
        raise RefusedMember(f"{shown} has a NUL byte in its name or its link")
    if not name or os.path.isabs(name):
        raise RefusedMember(f"{shown} points outside what was sent (an absolute path)")
    if ".." in name.split("/"):
        raise RefusedMember(f"{shown} points outside what was sent ('..')")
    relative = os.path.normpath(name)
    if relative == ".":
        raise RefusedMember(f"{shown} points outside what was sent (it names the top itself)")
    parent = os.path.realpath(os.path.join(root, os.path.dirname(relative)))
    target = os.path.join(parent, os.path.basename(relative))
    if not _inside(target, root) or target == root:
        raise RefusedMember(f"{shown} points outside what was sent")
    if member.islnk():
        link = member.linkname
        linked = os.path.realpath(os.path.join(root, link))
        if (
            not link
            or os.path.isabs(link)
            or ".." in link.split("/")
            or not _inside(linked, root)
            or linked == root
        ):
            raise RefusedMember(
                f"{shown} points outside what was sent (a hard link to {_shown(link)})"
            )
    return target, linked


def _extract(tar: tarfile.TarFile, root: str) -> None:
    for member in tar:
        target, linked = _check_member(member, root)
        # No set-id or sticky bits from what a client sent; owners as they were sent.
        member.mode &= 0o777
        try:
            _place(tar, member, root, target, linked)
        except OSError as exc:
            if exc.errno in STORE_ERRNOS:
                raise
            raise RefusedMember(
                f"{_shown(member.name)} cannot be written ({exc.strerror or exc})"
            ) from None
        except (OverflowError, ValueError) as exc:  # owners or times out of range
            raise RefusedMember(f"{_shown(member.name)} cannot be written ({exc})") from None


def _place(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root: str, target: str, linked: str
) -> None:
    """Write one checked member at ``target``, replacing what an earlier one left there.

    Links are made here, not by tarfile: when making one fails, tarfile
    falls back to extracting the member it names, which for odd names
    (``a/.``) is the member itself, over and over.
    """
    try:
        existing: os.stat_result | None = os.lstat(target)
    except FileNotFoundError:
        existing = None
    if member.issym() or member.islnk():
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise RefusedMember(f"{_shown(member.name)} is sent as a directory and as a link")
        if existing is not None:
            os.unlink(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if member.issym():
            os.symlink(member.linkname, target)
            os.lchown(target, member.uid, member.gid)
        elif not os.path.lexists(linked):
            raise RefusedMember(
                f"{_shown(member.name)} is a hard link to {_shown(member.linkname)}, "
                "which was not sent before it"
            )
        else:
            os.link(linked, target, follow_symlinks=False)
        return
    # tarfile writes a file, and sets a directory's mode and owner, through
    # whatever is already in its place: a link sent earlier under the same
    # name is replaced, never followed.
    if existing is not None and stat.S_ISLNK(existing.st_mode):
        os.unlink(target)
    member.name = os.path.relpath(target, root)  # where it was checked, links resolved
    tar.extract(member, root, numeric_owner=True, **_NO_FILTER)


# tarfile's own filters where it has them: ours above did the checking.
_NO_FILTER: dict[str, Any] = (
    {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
)


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
                with tarfile.open(
                    fileobj=cast(BinaryIO, stream), mode="r|", tarinfo=BoundedTarInfo
                ) as tar:
                    _extract(tar, str(entry.resolve()))
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
            top = entry / tops[0]
            if top.is_symlink():
                # What registryd reads through it (a build context, an archive)
                # would be whatever the link names, as root: the caller's own
                # files are what it may send.
                raise InvalidArgumentError(
                    f"what was sent is a symbolic link ({_shown(tops[0])} -> "
                    f"{_shown(os.readlink(top))}); send the file or directory it points to"
                )
        except RefusedMember as exc:
            shutil.rmtree(entry, ignore_errors=True)
            raise InvalidArgumentError(
                f"{exc}; move it out of the directory and try again"
            ) from None
        # ValueError, OverflowError, IndexError: tarfile's parsing of hostile headers
        except (tarfile.TarError, EOFError, ValueError, OverflowError, IndexError) as exc:
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

    @contextlib.asynccontextmanager
    async def using(self, *paths: str) -> AsyncIterator[None]:
        """For one call: the received entries among ``paths`` are kept, then removed."""
        self.claim(*paths)
        try:
            yield
        finally:
            await asyncio.to_thread(self.release, *paths)

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
