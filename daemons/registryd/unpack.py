"""Unpacking one layer blob into a directory that overlayfs can use as a lower dir.

The blob may be an uncompressed tar, gzip or zstd (told by its first bytes,
not by a media type that may lie). Entries keep their numeric owners, modes,
times, device numbers, hard links and extended attributes. OCI whiteouts
become overlayfs whiteouts: ``.wh.NAME`` a 0:0 character device ``NAME``,
``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr on its directory.

Nothing in a layer can write outside the destination: absolute names,
``..`` components and hard links outside the layer are refused, and no
path is ever followed through a symlink while unpacking (symlinks are
created as they are, to be resolved later inside the container's root).
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from shared.bus import InvalidArgumentError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# sdbus maps each error class to one bus name, so this is an alias, not a subclass.
LayerError = InvalidArgumentError  # a layer that cannot be unpacked safely or is corrupt


class _HashingReader(io.RawIOBase):
    """Passes reads through and hashes what it passed (the layer's diff id)."""

    def __init__(self, inner: IO[bytes] | gzip.GzipFile) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        return n

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def open_decompressed(handle: BinaryIO) -> IO[bytes] | gzip.GzipFile:
    """The uncompressed tar stream of a layer blob, whatever its compression."""
    magic = handle.read(4)
    handle.seek(0)
    if magic.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=handle, mode="rb")
    if magic.startswith(ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)
    return handle


def _parts(name: str, layer: str) -> list[str]:
    """The path components of a tar member name, or LayerError if it leaves the layer."""
    if name.startswith("/"):
        raise LayerError(f"layer {layer} has an entry with an absolute path ({name}); refusing it")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(
            f"layer {layer} has an entry that climbs out with '..' ({name}); refusing it"
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
    def __init__(self, dest: Path, layer: str) -> None:
        self.dest = dest
        self.layer = layer
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
                    f"layer {self.layer} writes {name} through a symbolic link; refusing it"
                )
            if not stat.S_ISDIR(info.st_mode):
                raise LayerError(
                    f"layer {self.layer} writes {name} under a path that is not a directory"
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
            source = tar.extractfile(member)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    if source is not None:
                        shutil.copyfileobj(source, out, CHUNK)
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

    def _link_target(self, member: tarfile.TarInfo) -> Path:
        target_parts = _parts(member.linkname, self.layer)
        if not target_parts:
            raise LayerError(
                f"layer {self.layer} hard-links {member.name} to the layer root; refusing it"
            )
        current = self.dest
        for part in target_parts[:-1]:
            current = current / part
            if current not in self.known_dirs and (
                not os.path.isdir(current) or os.path.islink(current)
            ):
                raise LayerError(
                    f"layer {self.layer} hard-links {member.name} to {member.linkname}, "
                    "which is not in the layer; refusing it"
                )
        target = current / target_parts[-1]
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            raise LayerError(
                f"layer {self.layer} hard-links {member.name} to {member.linkname}, "
                "which is not in the layer; refusing it"
            ) from None
        if stat.S_ISDIR(info.st_mode):
            raise LayerError(
                f"layer {self.layer} hard-links {member.name} to a directory; refusing it"
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
        hidden = parent / base[len(WHITEOUT_PREFIX) :]
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
            os.chmod(meta.path, meta.mode)
            os.utime(meta.path, (meta.mtime, meta.mtime))


def unpack_layer(blob: Path, dest: Path, layer: str, diff_id: str | None) -> None:
    """Unpack the layer blob ``blob`` into the new directory ``dest``.

    ``diff_id`` (the digest of the uncompressed tar, from the image config)
    is checked when given. On any failure ``dest`` may hold a partial tree:
    the caller unpacks into a temporary directory and renames it when this
    returns.
    """
    os.mkdir(dest, 0o755)
    with open(blob, "rb") as handle:
        stream = open_decompressed(handle)
        hashing = _HashingReader(stream)
        unpacker = _Unpacker(dest, layer)
        try:
            with tarfile.open(fileobj=hashing, mode="r|") as tar:
                for member in tar:
                    unpacker.entry(tar, member)
            hashing.drain()
        except (
            tarfile.TarError,
            EOFError,
            zstandard.ZstdError,
            gzip.BadGzipFile,
            zlib.error,
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
