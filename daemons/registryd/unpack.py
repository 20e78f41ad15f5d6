"""Unpacking one layer blob into a directory that overlayfs can use as a lower dir.

The blob may be an uncompressed tar, gzip or zstd (told by its first bytes,
not by a media type that may lie). Entries keep their numeric owners, modes,
times, device numbers, hard links and extended attributes. OCI whiteouts
become overlayfs whiteouts: ``.wh.NAME`` a 0:0 character device ``NAME``,
``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr on its directory.

Nothing in a layer can write outside the destination: absolute names,
``..`` components, whiteouts naming ``.``, ``..`` or nothing, and hard links
outside the layer are refused, and no path is ever followed through a
symlink while unpacking (symlinks are created as they are, to be resolved
later inside the container's root). What a layer unpacks to is bounded:
its tar stream and the files written from it each stop at ``max_unpacked``
bytes (a gzip or zstd bomb, a sparse file's holes), and a tar's special
headers (PAX, GNU long names) at :data:`MAX_SPECIAL_HEADER`. Anything that
cannot be unpacked is a :data:`LayerError` naming the layer and the entry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tarfile
import threading
import urllib.parse
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

from shared.bus import InvalidArgumentError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
CHUNK = 1 << 20
PIPE_LIMIT = 4 << 20  # bytes of a blob waiting for its unpacking thread, at most
# Receiving threads that hash, inflate and write at once: one per core. More only fight
# over the GIL (six at once cost about a third more CPU than two on two cores); a thread
# waiting for its download's next bytes holds no slot, so slow downloads still overlap.
_WORKING = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))

GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 31  # the inflater reads a gzip member's header and checks its trailer
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WASM_MAGIC = b"\x00asm"  # a WebAssembly binary: stored as it is, never untarred
DEFAULT_MAX_UNPACKED = 50 << 30  # bytes a layer's tar may hold: max_layer_unpacked_size
# A PAX or GNU long-name header is read into memory whole: a real one is a
# few hundred bytes (Go's archive/tar stops at 1 MiB too).
MAX_SPECIAL_HEADER = 1 << 20
HEADER_BUDGET = 4 * MAX_SPECIAL_HEADER  # bytes read for one entry's headers, all kinds
# Errors of the disk the store is on, not of the layer: told as they are.
STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


# sdbus maps each error class to one bus name, so this is an alias, not a subclass.
LayerError = InvalidArgumentError  # a layer that cannot be unpacked safely or is corrupt


def human_size(size: int) -> str:
    """A byte count for a sentence: 512 B, 3.2 MiB, 10 GiB."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    units = ("KiB", "MiB", "GiB", "TiB")
    for unit in units:
        value /= 1024
        if value < 1024 or unit == units[-1]:
            break
    return f"{value:.1f} {unit}".replace(".0 ", " ")


def _too_large(layer: str, limit: int) -> LayerError:
    return LayerError(
        f"layer {layer} unpacks to more than {human_size(limit)}, the limit; raise "
        "max_layer_unpacked_size in registryd.toml if the image is trusted"
    )


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _HashingReader:
    """Passes reads through, hashes what it passed (the layer's diff id; unless ``hashed``
    is False) and stops at ``limit`` bytes (a decompression bomb)."""

    def __init__(self, inner: _Readable, layer: str, limit: int, *, hashed: bool = True) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.hashed = hashed
        self.layer = layer
        self.limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise _too_large(self.layer, self.limit)
        if self.hashed:
            self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _TarReader:
    """An uncompressed tar stream as tarfile's seekable mode reads it, copied without copies.

    tarfile's stream mode ("r|") keeps what it read ahead in one bytes object
    and slices it at every read: each header copied the rest of its buffer
    (a megabyte) and each file's bytes were copied four or five times, all
    while the thread held the GIL that the other layers' threads and the
    event loop wait on. Here tarfile reads only headers (``read``, ``tell``
    and a ``seek`` that only goes forward, reading what it passes over); a
    regular file's bytes go from the source's pieces straight to the file
    (:meth:`copy_to`).
    """

    def __init__(self, source: _Readable) -> None:
        self.source = source
        self.pending = memoryview(b"")  # read from the source, not taken yet
        self.position = 0

    def _fill(self) -> bool:
        if not self.pending:
            self.pending = memoryview(self.source.read(CHUNK))
        return bool(self.pending)

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes (all that is left for -1); fewer only at the end."""
        parts: list[memoryview] = []
        wanted = size if size >= 0 else -1
        while wanted and self._fill():
            piece = self.pending if wanted < 0 else self.pending[:wanted]
            parts.append(piece)
            self.pending = self.pending[len(piece) :]
            self.position += len(piece)
            if wanted > 0:
                wanted -= len(piece)
        return b"".join(parts)

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < self.position:
            # a header that points back into what was read (a sparse map longer than
            # its data): the layer's fault, told as a tar that cannot be read
            raise tarfile.StreamError("seeking backwards is not allowed")
        while self.position < offset and self._fill():
            step = min(offset - self.position, len(self.pending))
            self.pending = self.pending[step:]
            self.position += step
        return self.position

    def copy_to(self, fd: int, count: int) -> int:
        """Write the next ``count`` bytes to ``fd``; how many there were (fewer at the end)."""
        done = 0
        while done < count and self._fill():
            piece = self.pending[: count - done]
            written = 0
            while written < len(piece):
                written += os.write(fd, piece[written:])
            self.pending = self.pending[len(piece) :]
            self.position += len(piece)
            done += len(piece)
        return done


class _Gunzip:
    """A gzip stream, inflated as it is read, in the pieces its source gives.

    ``gzip.GzipFile`` reads its source 8 KiB at a time and sums each piece's
    CRC-32 in a call of its own, which cost more than the inflating; here the
    inflater (ISA-L, about twice zlib's speed) takes what the source gives and
    checks each member's trailer (CRC-32 and size) itself. Members may follow
    one another (pigz, concatenated layers); zero bytes after a member are
    padding, as gzip allows.
    """

    def __init__(self, source: _Readable) -> None:
        from isal import isal_zlib  # with the first gzip layer, not at registryd's start

        self.isal_zlib = isal_zlib
        self.source = source
        self.inflater = isal_zlib.decompressobj(GZIP_WBITS)
        self.pending = b""  # input read but not inflated yet
        self.in_member = True
        self.source_ended = False

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        if size == 0:
            return b""  # a max_length of 0 would mean no limit to the inflater
        while True:
            if not self.pending and not self.source_ended:
                self.pending = self.source.read(CHUNK)
                self.source_ended = not self.pending
            if not self.in_member:
                self.pending = self.pending.lstrip(b"\0")
                if not self.pending:
                    if self.source_ended:
                        return b""
                    continue
                self.inflater = self.isal_zlib.decompressobj(GZIP_WBITS)
                self.in_member = True
            data, self.pending = self.pending, b""
            out = self.inflater.decompress(data, size) if data else self.inflater.flush(size)
            if self.inflater.eof:
                self.pending = self.inflater.unused_data
                self.in_member = False
            else:
                self.pending = self.inflater.unconsumed_tail
                if not out and not self.pending and self.source_ended:
                    raise EOFError(
                        "Compressed file ended before the end-of-stream marker was reached"
                    )
            if out:
                return out


def _inflate_error() -> type[Exception]:
    """What the inflater raises for a corrupt stream (its stub types it as an instance)."""
    from isal import isal_zlib

    return cast("type[Exception]", isal_zlib.error)


def open_decompressed(handle: BinaryIO) -> _Readable:
    """The uncompressed tar stream of a layer blob, whatever its compression."""
    magic = handle.read(len(ZSTD_MAGIC))
    handle.seek(0)
    return _decompressed(handle, magic)


def _decompressed(source: _Readable, magic: bytes) -> _Readable:
    """The uncompressed stream of ``source``, whose first bytes are ``magic``."""
    if magic.startswith(GZIP_MAGIC):
        return _Gunzip(source)
    if magic.startswith(ZSTD_MAGIC):
        reader: _Readable = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], source), read_across_frames=True, closefd=False
        )
        return reader
    return source


_SPECIAL_HEADERS = frozenset(
    {
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    }
)


class _HeaderBudget:
    """The archive's stream while tarfile reads one member's headers: at most ``budget`` bytes.

    GNU sparse maps (old GNU extension blocks, the 1.0 map before the data)
    are read into lists, one block after another, with no bound of their own.
    """

    def __init__(self, inner: Any, budget: int) -> None:  # tarfile's stream
        self.inner = inner
        self.budget = budget

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.inner.read(size)
        self.budget -= len(data)
        if self.budget < 0:
            raise tarfile.ReadError(
                f"headers of more than {human_size(HEADER_BUDGET)} for one entry "
                "(a sparse file's map?)"
            )
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose PAX or GNU long-name payload (read into memory whole) is bounded,
    as is everything read for one member's headers."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _SPECIAL_HEADERS and self.size > MAX_SPECIAL_HEADER:
            raise tarfile.ReadError(
                f"a header of {human_size(self.size)}, more than {human_size(MAX_SPECIAL_HEADER)}"
            )
        stream = archive.fileobj
        assert stream is not None
        archive.fileobj = _HeaderBudget(stream, HEADER_BUDGET)  # type: ignore[assignment]
        try:
            found: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
        finally:
            archive.fileobj = stream
        return found


def _parts(name: str, layer: str) -> list[str]:
    """The path components of a tar member name, or LayerError if it leaves the layer."""
    if "\0" in name:
        raise LayerError(f"layer {layer} has an entry whose name holds a NUL byte; refusing it")
    if name.startswith("/"):
        raise LayerError(
            f"layer {layer} has an entry with an absolute path ({name!r}); refusing it"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(
            f"layer {layer} has an entry that climbs out with '..' ({name!r}); refusing it"
        )
    return parts


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decodes PAX values with surrogateescape: this gives back the bytes.
            found[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            found[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    # A layer must not smuggle overlayfs metadata (redirects, opaque dirs) in
    # as xattrs; only whiteout entries may produce it.
    return {k: v for k, v in found.items() if not k.startswith("trusted.overlay.")}


@dataclass
class _DirMeta:
    path: Path
    mode: int
    mtime: float


class _Unpacker:
    def __init__(self, dest: Path, layer: str, limit: int = DEFAULT_MAX_UNPACKED) -> None:
        self.dest = dest
        self.layer = layer
        self.limit = limit  # bytes written to files, at most (a sparse file's holes count)
        self.written = 0
        self.known_dirs: set[Path] = {dest}
        self.dir_meta: dict[Path, _DirMeta] = {}

    # ------------------------------------------------------------ paths

    def _ensure_parent(self, parts: list[str], name: str) -> Path:
        """The parent directory of ``parts``, created as needed, never through a symlink."""
        current = self.dest
        for part in parts[:-1]:
            current = current / part
            if current in self.known_dirs:
                continue
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                self.known_dirs.add(current)
                continue
            if stat.S_ISLNK(info.st_mode):
                raise LayerError(
                    f"layer {self.layer} writes {name!r} through a symbolic link; refusing it"
                )
            if not stat.S_ISDIR(info.st_mode):
                raise LayerError(
                    f"layer {self.layer} writes {name!r} under a path that is not a directory"
                )
            self.known_dirs.add(current)
        return current

    def _clear(self, path: Path, keep_dir: bool = False) -> None:
        """Remove whatever is at ``path`` so a new entry can take its place."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            if keep_dir:
                return
            shutil.rmtree(path)
            self.known_dirs = {d for d in self.known_dirs if not d.is_relative_to(path)}
            self.dir_meta = {d: m for d, m in self.dir_meta.items() if not d.is_relative_to(path)}
        else:
            os.unlink(path)

    # ------------------------------------------------------------ entries

    def entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Unpack one member; what the layer's content makes fail is a LayerError naming it."""
        with self._refusing(member.name):
            self._entry(tar, member)

    @contextlib.contextmanager
    def _refusing(self, name: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno in STORE_ERRNOS:
                raise  # the store's disk, not the layer: the caller tells it as such
            raise LayerError(
                f"layer {self.layer} has an entry {name!r} that cannot be unpacked "
                f"({exc.strerror or exc}); refusing it"
            ) from None
        except (OverflowError, ValueError) as exc:  # owners, times, devices out of range
            raise LayerError(
                f"layer {self.layer} has an entry {name!r} with a value out of range "
                f"({exc}); refusing it"
            ) from None

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _parts(member.name, self.layer)
        if not parts:  # the layer's root directory itself
            if member.isdir():
                os.chown(self.dest, member.uid, member.gid)
                self.dir_meta[self.dest] = _DirMeta(self.dest, member.mode & 0o7777, member.mtime)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member.name)
            return
        parent = self._ensure_parent(parts, member.name)
        path = parent / base
        mode = member.mode & 0o7777
        if member.isdir():
            self._clear(path, keep_dir=True)
            if not os.path.lexists(path):
                os.mkdir(path, 0o700)
            self.known_dirs.add(path)
            os.chown(path, member.uid, member.gid)
            self._set_xattrs(path, member, follow=True)
            self.dir_meta[path] = _DirMeta(path, mode, member.mtime)
        elif member.isreg():
            self._clear(path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
            try:
                if isinstance(tar.fileobj, _TarReader) and not member.issparse():
                    self._count(member.size)
                    if tar.fileobj.copy_to(fd, member.size) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                else:  # a sparse file's map of holes is tarfile's to follow
                    source = tar.extractfile(member)
                    with os.fdopen(fd, "wb", closefd=False) as out:
                        if source is not None:
                            self._copy(source, out)
                # chown before chmod: chown clears setuid and setgid bits.
                os.fchown(fd, member.uid, member.gid)
                os.fchmod(fd, mode)
                self._set_xattrs(path, member, follow=True)
                os.utime(fd, (member.mtime, member.mtime))
            finally:
                os.close(fd)
        elif member.issym():
            self._clear(path)
            os.symlink(member.linkname, path)
            os.lchown(path, member.uid, member.gid)
            self._set_xattrs(path, member, follow=False)
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        elif member.islnk():
            target = self._link_target(member)
            if target == path:
                return
            self._clear(path)
            os.link(target, path, follow_symlinks=False)
        elif member.ischr() or member.isblk() or member.isfifo():
            self._clear(path)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else 0
            if member.isfifo():
                os.mkfifo(path, 0o600)
            else:
                os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            os.lchown(path, member.uid, member.gid)
            os.chmod(path, mode)
            self._set_xattrs(path, member, follow=False)
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        # Other member types (GNU volume headers and the like) carry no file.

    def _copy(self, source: IO[bytes], out: IO[bytes]) -> None:
        while chunk := source.read(CHUNK):
            self._count(len(chunk))
            out.write(chunk)

    def _count(self, size: int) -> None:
        """Count ``size`` more bytes written; refuse a layer past its limit before writing them."""
        self.written += size
        if self.written > self.limit:
            raise _too_large(self.layer, self.limit)

    def _link_target(self, member: tarfile.TarInfo) -> Path:
        target_parts = _parts(member.linkname, self.layer)
        if not target_parts:
            raise LayerError(
                f"layer {self.layer} hard-links {member.name!r} to the layer root; refusing it"
            )
        current = self.dest
        for part in target_parts[:-1]:
            current = current / part
            if current not in self.known_dirs and (
                not os.path.isdir(current) or os.path.islink(current)
            ):
                raise LayerError(
                    f"layer {self.layer} hard-links {member.name!r} to {member.linkname!r}, "
                    "which is not in the layer; refusing it"
                )
        target = current / target_parts[-1]
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            raise LayerError(
                f"layer {self.layer} hard-links {member.name!r} to {member.linkname!r}, "
                "which is not in the layer; refusing it"
            ) from None
        if stat.S_ISDIR(info.st_mode):
            raise LayerError(
                f"layer {self.layer} hard-links {member.name!r} to a directory; refusing it"
            )
        return target

    def _whiteout(self, parts: list[str], name: str) -> None:
        parent = self._ensure_parent(parts, name)
        base = parts[-1]
        if base == OPAQUE_MARKER:
            os.setxattr(parent, OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, ...) has no overlayfs meaning
        target = base[len(WHITEOUT_PREFIX) :]
        # pathlib drops "." and "" and keeps "..": each would clear the layer
        # directory or its parent, not an entry in it.
        hidden = parent / target
        if target in ("", ".", "..") or hidden.parent != parent or hidden == self.dest:
            raise LayerError(
                f"layer {self.layer} has a whiteout {name!r} that names no file in its "
                "directory; refusing it"
            )
        self._clear(hidden)
        try:
            os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        except PermissionError:
            raise LayerError(
                f"layer {self.layer} deletes files (whiteouts), which only root can unpack; "
                "run zlayer-registryd as root"
            ) from None

    def _set_xattrs(self, path: Path, member: tarfile.TarInfo, follow: bool) -> None:
        for key, value in _xattrs(member).items():
            try:
                os.setxattr(path, key, value, follow_symlinks=follow)
            except OSError as exc:
                # user.* xattrs cannot sit on symlinks or devices, and some
                # file systems have no xattrs: the file is still usable.
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise

    def finish(self) -> None:
        """Directory modes and times last: adding entries would change them again."""
        for meta in sorted(self.dir_meta.values(), key=lambda m: len(m.path.parts), reverse=True):
            with self._refusing(str(meta.path.relative_to(self.dest))):
                os.chmod(meta.path, meta.mode)
                os.utime(meta.path, (meta.mtime, meta.mtime))


def unpack_layer(
    blob: Path,
    dest: Path,
    layer: str,
    diff_id: str | None,
    max_unpacked: int = DEFAULT_MAX_UNPACKED,
) -> None:
    """Unpack the layer blob ``blob`` into the new directory ``dest``.

    ``diff_id`` (the digest of the uncompressed tar, from the image config)
    is checked when given; a tar larger than ``max_unpacked`` bytes is
    refused. On any failure ``dest`` may hold a partial tree: the caller
    unpacks into a temporary directory and renames it when this returns.
    """
    os.mkdir(dest, 0o755)
    with open(blob, "rb") as handle:
        stream = open_decompressed(handle)
        _unpack_tar(stream, dest, layer, diff_id, max_unpacked)


def _unpack_tar(
    stream: _Readable,
    dest: Path,
    layer: str,
    diff_id: str | None,
    max_unpacked: int = DEFAULT_MAX_UNPACKED,
) -> None:
    """Untar the uncompressed ``stream`` into ``dest``, reading it to its end, and check it."""
    hashing = _HashingReader(stream, layer, max_unpacked, hashed=diff_id is not None)
    unpacker = _Unpacker(dest, layer, max_unpacked)
    try:
        reader = _TarReader(hashing)
        with tarfile.open(
            fileobj=cast(IO[bytes], reader), mode="r:", tarinfo=BoundedTarInfo
        ) as tar:
            # A stream's members are never looked up again (hard links are
            # ours to resolve): the list tarfile keeps of them is emptied as
            # it goes, not grown to millions of headers.
            seen: list[tarfile.TarInfo] = tar.members  # type: ignore[attr-defined]
            while (member := tar.next()) is not None:
                unpacker.entry(tar, member)
                seen.clear()
        hashing.drain()
    except (
        tarfile.TarError,
        EOFError,
        zstandard.ZstdError,
        _inflate_error(),
        # tarfile's parsing of hostile PAX and sparse headers (numbers that are not,
        # a sparse map cut short)
        ValueError,
        OverflowError,
        IndexError,
    ) as exc:
        raise LayerError(f"layer {layer} is not a readable tar ({exc})") from None
    unpacker.finish()
    if diff_id is not None:
        actual = "sha256:" + hashing.hash.hexdigest()
        if actual != diff_id:
            raise LayerError(
                f"layer {layer} unpacks to {actual}, but the image config says {diff_id}; "
                "the archive is corrupt"
            )


# ---------------------------------------------------------------- blobs as they arrive


class PipeAbortedError(Exception):
    """The writer of a :class:`Pipe` gave up (a broken download, a cancelled pull)."""


class ReaderGoneError(Exception):
    """The thread reading a :class:`Pipe` stopped; its own error says why."""


class Pipe:
    """Bytes handed from the event loop to one worker thread, at most ``limit`` waiting.

    The loop side awaits :meth:`write` (it waits while the buffer is full, so
    memory stays bounded however fast the registry sends), then calls
    :meth:`end` or :meth:`abort`; the thread side calls :meth:`read`, which
    blocks until bytes arrive.
    """

    def __init__(self, limit: int = PIPE_LIMIT) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._ended = False
        self._aborted = False
        self._reader_gone = False
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ the event loop's side

    async def write(self, data: bytes) -> None:
        if not data:
            return
        while True:
            with self._cond:
                if self._reader_gone:
                    raise ReaderGoneError
                if self._aborted or self._ended:
                    raise PipeAbortedError("the pipe is closed")
                if self._buffered < self.limit:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    self._cond.notify()
                    return
                self._loop = asyncio.get_running_loop()
                waiter = self._waiter = self._loop.create_future()
            await waiter

    def end(self) -> None:
        """Everything was written: the reader sees the end once it has read it all."""
        with self._cond:
            self._ended = True
            self._cond.notify()

    def abort(self) -> None:
        """Stop the reader: its next :meth:`read` raises :class:`PipeAbortedError`."""
        with self._cond:
            self._aborted = True
            self._chunks.clear()
            self._buffered = 0
            self._cond.notify()
            self._wake_writer()

    # ------------------------------------------------------------ the thread's side

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes, waiting for some; b"" at the end."""
        with self._cond:
            while not self._chunks and not self._ended and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise PipeAbortedError("the download was abandoned")
            if not self._chunks:
                return b""
            taken = [self._chunks.popleft()]
            total = len(taken[0])
            while self._chunks and total + len(self._chunks[0]) <= size:
                total += len(self._chunks[0])
                taken.append(self._chunks.popleft())
            data = taken[0] if len(taken) == 1 else b"".join(taken)
            if len(data) > size:
                self._chunks.appendleft(data[size:])
                data = data[:size]
            self._buffered -= len(data)
            self._wake_writer()
            return data

    def reader_gone(self) -> None:
        with self._cond:
            self._reader_gone = True
            self._wake_writer(always=True)

    def _wake_writer(self, always: bool = False) -> None:
        """Release a writer waiting for room (the condition's lock is held)."""
        waiter, loop = self._waiter, self._loop
        if waiter is None or loop is None or not (always or self._buffered < self.limit):
            return
        self._waiter = None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_release, waiter)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Intake:
    """A blob's bytes: first what its partial file already holds, then what the pipe brings.

    Everything read is hashed (the blob's digest); what comes from the pipe
    is appended to the partial file first, so a broken pull resumes from it.
    Reads hand on the pipe's own bytes objects, never copied into a buffer.
    """

    def __init__(self, pipe: Pipe, partial: Path, prefix: int) -> None:
        self.pipe = pipe
        self.hash = hashlib.sha256()
        self.size = 0
        self._prefix_left = prefix
        self._prefix = open(partial, "rb") if prefix else None  # noqa: SIM115
        self._out = open(partial, "ab", buffering=0)  # noqa: SIM115
        self._head = b""
        # A write to the partial file that failed (a full disk): a chunk is
        # lost, so every later read fails too, however the unpacking took it.
        self.failure: OSError | None = None

    def __enter__(self) -> _Intake:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def read(self, size: int = CHUNK) -> bytes:
        """Up to ``size`` bytes (CHUNK for -1), b"" at the end."""
        if size < 0:
            size = CHUNK
        if self._head:
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._take(size)

    def _take(self, size: int) -> bytes:
        if self.failure is not None:
            raise self.failure
        if self._prefix is not None:
            data = self._prefix.read(min(size, self._prefix_left))
            if not data:
                raise OSError(errno.EIO, "the partial download is shorter than it was")
            self._prefix_left -= len(data)
            if not self._prefix_left:
                self._prefix.close()
                self._prefix = None
            self.hash.update(data)
            self.size += len(data)
            return data
        _WORKING.release()  # receive_blob holds a slot; waiting for bytes is no work
        try:
            data = self.pipe.read(size)
        finally:
            _WORKING.acquire()
        if data:
            view = memoryview(data)
            written = 0
            try:
                while written < len(data):
                    written += self._out.write(view[written:]) or 0
            except OSError as exc:
                self.failure = exc
                raise
            self.hash.update(data)
            self.size += len(data)
        return data

    def head(self, count: int) -> bytes:
        """The first ``count`` bytes (fewer at the end), which later reads give again."""
        while len(self._head) < count:
            data = self._take(count - len(self._head))
            if not data:
                break
            self._head += data
        return self._head

    def finish(self) -> None:
        """The blob is whole. Its partial file is made durable by the caller's one sync of
        the store (with the tree and the other blobs), before the blob counts as stored."""
        self._out.flush()

    def close(self) -> None:
        if self._prefix is not None:
            self._prefix.close()
        self._out.close()


@dataclass
class Received:
    """What :func:`receive_blob` made of a blob: its digest, size, and whether it is unpacked."""

    digest: str
    size: int
    unpacked: bool


def receive_blob(
    pipe: Pipe,
    partial: Path,
    prefix: int,
    expected: tuple[str, int],
    dest: Path | None,
    diff_id: str | None,
    max_unpacked: int = DEFAULT_MAX_UNPACKED,
) -> Received:
    """Take a blob from ``pipe`` in one pass: append it to ``partial``, hash it, and unpack it.

    ``partial`` already holds its first ``prefix`` bytes (a resumed
    download): they are read again for the hash and the unpacking. With a
    ``dest``, a tar layer (plain, gzip or zstd) is unpacked into that new
    directory as it streams, and ``diff_id`` checked (a tar larger than
    ``max_unpacked`` bytes is refused); a WebAssembly blob is only stored.
    ``expected`` is the (digest, size) the manifest gives.

    Blocking, for a worker thread. The digest is checked before anything
    else: a blob whose content is not its digest raises CorruptBlobError
    (from the caller's error types) even when it also fails to unpack, and
    its partial file and ``dest`` are deleted. A pipe the loop aborts keeps
    the partial file for a resume and deletes ``dest``.

    At most one receiving thread per core works at a time (``_WORKING``).
    """
    _WORKING.acquire()
    try:
        return _receive_blob(pipe, partial, prefix, expected, dest, diff_id, max_unpacked)
    finally:
        _WORKING.release()


def _receive_blob(
    pipe: Pipe,
    partial: Path,
    prefix: int,
    expected: tuple[str, int],
    dest: Path | None,
    diff_id: str | None,
    max_unpacked: int,
) -> Received:
    digest, size = expected
    unpacked = False
    problem: Exception | None = None
    try:
        with _Intake(pipe, partial, prefix) as intake:
            head = intake.head(len(WASM_MAGIC))
            if dest is not None and head != WASM_MAGIC:
                os.mkdir(dest, 0o755)
                stream = _decompressed(intake, head)
                # A plain tar's diff id is its digest: the blob's own hash, checked below
                # before anything is kept, covers it (a second SHA-256 pass saved).
                unpacked_id = None if stream is intake and diff_id == digest else diff_id
                try:
                    _unpack_tar(stream, dest, digest, unpacked_id, max_unpacked)
                    unpacked = True
                except PipeAbortedError:
                    raise
                except Exception as exc:  # told only once the digest is known to match
                    problem = exc
                while intake.read(CHUNK):  # the rest of the blob: its digest needs it all
                    pass
            else:
                while intake.read(CHUNK):
                    pass
            if intake.failure is not None:  # not the blob's fault: keep what is on disk
                raise intake.failure
            actual = "sha256:" + intake.hash.hexdigest()
            whole = intake.size
            intact = actual == digest and (not size or whole == size)
            if intact and problem is None:
                intake.finish()
    except BaseException:
        pipe.reader_gone()
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    pipe.reader_gone()
    if not intact or problem is not None:
        partial.unlink(missing_ok=True)
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        if intact and problem is not None:
            raise problem
    return Received(actual, whole, unpacked and intact)
