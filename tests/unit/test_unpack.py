"""registryd's layer unpacker on real tar files: file kinds, whiteouts, refused escapes, and
blobs unpacked as they stream in (digest first, resumes, abandoned downloads)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons.registryd.unpack import (
    OPAQUE_XATTR,
    Pipe,
    PipeAbortedError,
    ReaderGoneError,
    Received,
    receive_blob,
    unpack_layer,
)
from shared.bus import InvalidArgumentError
from shared.busybox_image import Compression, Entry, compress, make_tar

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="owners, devices and whiteouts need root")


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="zlunpack-") as name:
        yield Path(name)


def unpack(workdir: Path, entries: list[Entry], compression: Compression = "none") -> Path:
    data = make_tar(entries)
    blob = workdir / "blob"
    blob.write_bytes(compress(data, compression))
    dest = workdir / "layer"
    unpack_layer(blob, dest, "sha256:test", "sha256:" + hashlib.sha256(data).hexdigest())
    return dest


def refused(workdir: Path, entries: list[Entry]) -> str:
    with pytest.raises(InvalidArgumentError) as caught:
        unpack(workdir, entries)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_files_dirs_links_in_any_compression(workdir: Path, compression: Compression) -> None:
    dest = unpack(
        workdir,
        [
            Entry("./", "dir", mode=0o755),
            Entry("bin", "dir", mode=0o755),
            Entry("bin/tool", "file", b"#!/bin/sh\n", mode=0o755),
            Entry("bin/alias", "symlink", target="tool"),
            Entry("bin/abs", "symlink", target="/etc/shadow"),
            Entry("bin/same", "hardlink", target="bin/tool"),
            Entry("deep/er/file", "file", b"x"),  # parents implied, not listed
            Entry("ro", "dir", mode=0o555),
            Entry("ro/inside", "file", b"y", mode=0o400),
        ],
        compression,
    )
    assert (dest / "bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(os.stat(dest / "bin/tool").st_mode) == 0o755
    assert os.readlink(dest / "bin/alias") == "tool"
    # Absolute symlinks are kept as they are: they resolve inside the container.
    assert os.readlink(dest / "bin/abs") == "/etc/shadow"
    assert os.stat(dest / "bin/same").st_ino == os.stat(dest / "bin/tool").st_ino
    assert (dest / "deep/er/file").read_bytes() == b"x"
    assert stat.S_IMODE(os.stat(dest / "deep").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "ro").st_mode) == 0o555
    assert (dest / "ro/inside").read_bytes() == b"y"
    assert os.stat(dest / "bin").st_mtime == os.stat(dest / "ro").st_mtime


@root_only
def test_owners_modes_devices_and_xattrs(workdir: Path) -> None:
    dest = unpack(
        workdir,
        [
            Entry("su", "file", b"s", mode=0o4755, uid=1000, gid=1000),
            Entry("home", "dir", mode=0o750, uid=1000, gid=100),
            Entry("link", "symlink", target="su", uid=7, gid=8),
            Entry("null", "char", mode=0o666, devmajor=1, devminor=3),
            Entry("loop", "block", mode=0o660, devmajor=7, devminor=0),
            Entry("pipe", "fifo", mode=0o644),
            Entry("cap", "file", b"c", xattrs={"user.zlayer": "yes"}),
            Entry("sneaky", "dir", xattrs={"trusted.overlay.redirect": "/etc"}),
        ],
    )
    su = os.stat(dest / "su")
    assert (su.st_uid, su.st_gid, stat.S_IMODE(su.st_mode)) == (1000, 1000, 0o4755)
    home = os.stat(dest / "home")
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 100, 0o750)
    link = os.lstat(dest / "link")
    assert (link.st_uid, link.st_gid) == (7, 8)
    null = os.stat(dest / "null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
    assert os.minor(null.st_rdev) == 3 and stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(os.stat(dest / "loop").st_mode)
    assert stat.S_ISFIFO(os.stat(dest / "pipe").st_mode)
    assert os.getxattr(dest / "cap", "user.zlayer") == b"yes"
    # overlayfs metadata may only come from whiteouts, never from the archive.
    assert "trusted.overlay.redirect" not in os.listxattr(dest / "sneaky")


@root_only
def test_whiteouts_become_overlayfs_whiteouts(workdir: Path) -> None:
    dest = unpack(
        workdir,
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/.wh.motd", "file"),
            Entry("var", "dir", mode=0o755),
            Entry("var/cache", "dir", mode=0o755),
            Entry("var/cache/.wh..wh..opq", "file"),
            Entry("var/cache/kept", "file", b"k"),
            Entry("gone/.wh.deeper", "file"),  # parent implied
            Entry(".wh..wh.plnk", "dir"),  # AUFS hard-link store: no overlayfs meaning
        ],
    )
    motd = os.lstat(dest / "etc/motd")
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == os.makedev(0, 0)
    assert not (dest / "etc/.wh.motd").exists()
    assert os.getxattr(dest / "var/cache", OPAQUE_XATTR) == b"y"
    assert not os.path.lexists(dest / "var/cache/.wh..wh..opq")
    assert (dest / "var/cache/kept").read_bytes() == b"k"
    assert stat.S_ISCHR(os.lstat(dest / "gone/deeper").st_mode)
    assert not os.path.lexists(dest / ".wh..wh.plnk")


def test_later_entries_replace_earlier_ones(workdir: Path) -> None:
    dest = unpack(
        workdir,
        [
            Entry("a", "symlink", target="/etc/passwd"),
            Entry("a", "file", b"plain"),  # must replace the link, not write through it
            Entry("d", "dir"),
            Entry("d/x", "file", b"x"),
            Entry("d", "file", b"now a file"),
        ],
    )
    assert not os.path.islink(dest / "a") and (dest / "a").read_bytes() == b"plain"
    assert (dest / "d").read_bytes() == b"now a file"


@pytest.mark.parametrize(
    ("entries", "says"),
    [
        ([Entry("/etc/passwd", "file", b"x")], "absolute path"),
        ([Entry("../escape", "file", b"x")], "'..'"),
        ([Entry("a/../../escape", "file", b"x")], "'..'"),
        ([Entry("link", "hardlink", target="/etc/passwd")], "absolute path"),
        ([Entry("link", "hardlink", target="../../etc/passwd")], "'..'"),
        ([Entry("link", "hardlink", target="missing")], "not in the layer"),
        (
            [Entry("out", "symlink", target="/etc"), Entry("out/passwd", "file", b"x")],
            "through a symbolic link",
        ),
        (
            [Entry("out", "symlink", target="/etc"), Entry("h", "hardlink", target="out/passwd")],
            "not in the layer",
        ),
        ([Entry("out", "symlink", target="/tmp"), Entry("out/.wh.x", "file")], "symbolic link"),
    ],
)
def test_refuses_to_write_outside_the_layer(workdir: Path, entries: list[Entry], says: str) -> None:
    outside_before = set(os.listdir(workdir))
    message = refused(workdir, entries)
    assert says in message and "sha256:test" in message
    assert set(os.listdir(workdir)) - outside_before <= {"layer", "blob"}


def test_a_layer_that_does_not_match_its_diff_id_is_refused(workdir: Path) -> None:
    blob = workdir / "blob"
    blob.write_bytes(make_tar([Entry("f", "file", b"x")]))
    with pytest.raises(InvalidArgumentError, match="archive is corrupt"):
        unpack_layer(blob, workdir / "layer", "sha256:test", "sha256:" + "0" * 64)


def test_a_blob_that_is_not_a_tar_is_refused(workdir: Path) -> None:
    blob = workdir / "blob"
    blob.write_bytes(b"\x1f\x8b" + b"not really gzip" * 40)
    with pytest.raises(InvalidArgumentError, match="not a readable tar"):
        unpack_layer(blob, workdir / "layer", "sha256:test", None)


def _old_gnu_sparse(name: str, hole: int, data: bytes) -> bytes:
    """An old GNU sparse member, its header made by hand (tarfile cannot write one): a hole
    of ``hole`` bytes, then ``data`` (one block)."""
    assert len(data) == tarfile.BLOCKSIZE
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = len(data)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % hole  # the map's one entry: its offset and size
    header[398:410] = b"%011o\0" % len(data)
    header[483:495] = b"%011o\0" % (hole + len(data))  # the file's real size
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data


def test_contents_unpack_as_tarfile_extracts_them(workdir: Path) -> None:
    """Files spanning the reader's pieces, PAX long names, a sparse file and empty files come
    out byte for byte as Python's own extraction writes them."""
    members = [
        ("big", os.urandom((3 << 20) + 7)),
        ("d/" + "long-name-" * 20, os.urandom(70_001)),
        ("empty", b""),
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in members[:2]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        buffer.write(_old_gnu_sparse("sparse", 1 << 20, b"s" * tarfile.BLOCKSIZE))
        name, content = members[2]
        info = tarfile.TarInfo(name)
        archive.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo("after")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"after"))
    data = buffer.getvalue()
    blob = workdir / "blob"
    blob.write_bytes(data)
    unpack_layer(blob, workdir / "layer", "sha256:test", sha256(data))
    with tarfile.open(blob) as archive:
        archive.extractall(workdir / "reference", filter="data")
    assert {p: c for p, (_m, c) in tree(workdir / "layer").items()} == {
        p: c for p, (_m, c) in tree(workdir / "reference").items()
    }
    assert (workdir / "layer" / "sparse").read_bytes() == bytes(1 << 20) + b"s" * 512
    assert len(tree(workdir / "layer")) == 6  # big, d, the long name, sparse, empty, after


# ---------------------------------------------------------------- blobs received as they stream


def tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every path under ``root``: its mode and its content or link target."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            content: bytes | str = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = path.read_bytes()
        else:
            content = ""
        found[str(path.relative_to(root))] = (info.st_mode, content)
    return found


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


LAYER = [
    Entry("bin", "dir", mode=0o755),
    Entry("bin/tool", "file", os.urandom(3 << 20), mode=0o755),  # larger than the pipe's step
    Entry("bin/alias", "symlink", target="tool"),
    Entry("bin/same", "hardlink", target="bin/tool"),
    Entry("etc/conf", "file", b"a=1\n"),
]


def stream(
    blob: bytes,
    partial: Path,
    dest: Path | None,
    diff_id: str | None,
    *,
    expected: str | None = None,
    prefix: int = 0,
    step: int = 50_000,
    abort_after: int | None = None,
) -> Received:
    """Feed ``blob`` (from byte ``prefix`` on) through a Pipe to receive_blob in a thread."""

    async def run() -> Received:
        pipe = Pipe(limit=200_000)  # small, so the writer has to wait for the thread
        received = asyncio.get_running_loop().run_in_executor(
            None,
            receive_blob,
            pipe,
            partial,
            prefix,
            (expected or sha256(blob), len(blob)),
            dest,
            diff_id,
        )
        try:
            for offset in range(prefix, len(blob), step):
                if abort_after is not None and offset >= abort_after:
                    pipe.abort()
                    break
                await pipe.write(blob[offset : offset + step])
            else:
                pipe.end()
        except ReaderGoneError:
            pass
        return await received

    return asyncio.run(run())


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_a_streamed_blob_is_stored_and_unpacked_like_a_stored_one(
    workdir: Path, compression: Compression
) -> None:
    data = make_tar(LAYER)
    blob = compress(data, compression)
    partial = workdir / "partial"
    received = stream(blob, partial, workdir / "streamed", sha256(data))
    assert received == Received(sha256(blob), len(blob), True)
    assert partial.read_bytes() == blob  # what goes into blobs/ once the caller keeps it
    stored = workdir / "stored"
    stored.write_bytes(blob)
    unpack_layer(stored, workdir / "unpacked", "sha256:test", sha256(data))
    assert tree(workdir / "streamed") == tree(workdir / "unpacked")


def gzip_members(data: bytes) -> bytes:
    """``data`` as two gzip members and zero padding, as pigz or a concatenation leaves it."""
    cut = len(data) // 3
    return gzip.compress(data[:cut], 1) + gzip.compress(data[cut:], 9) + b"\0" * 7


@pytest.mark.parametrize("streamed", [False, True])
def test_a_gzip_blob_of_several_members_unpacks_whole(workdir: Path, streamed: bool) -> None:
    data = make_tar(LAYER)
    blob = gzip_members(data)
    if streamed:
        received = stream(blob, workdir / "partial", workdir / "layer", sha256(data))
        assert received == Received(sha256(blob), len(blob), True)
    else:
        (workdir / "blob").write_bytes(blob)
        unpack_layer(workdir / "blob", workdir / "layer", "sha256:test", sha256(data))
    assert (workdir / "layer/bin/tool").read_bytes() == LAYER[1].data
    assert (workdir / "layer/etc/conf").read_bytes() == b"a=1\n"


def damaged_gzip(data: bytes, damage: str) -> bytes:
    blob = bytearray(gzip.compress(data))
    if damage == "cut short":
        return bytes(blob[: len(blob) // 2])
    if damage == "trailer cut off":
        return bytes(blob[:-8])
    if damage == "wrong checksum":
        blob[-8] ^= 1  # the CRC-32 of the trailer
    elif damage == "wrong size":
        blob[-1] ^= 1  # the size of the trailer
    elif damage == "garbage after it":
        blob += b"not gzip at all" * 4
    return bytes(blob)


GZIP_DAMAGE = ["cut short", "trailer cut off", "wrong checksum", "wrong size", "garbage after it"]


@pytest.mark.parametrize("damage", GZIP_DAMAGE)
def test_a_damaged_gzip_layer_is_refused(workdir: Path, damage: str) -> None:
    blob = workdir / "blob"
    blob.write_bytes(damaged_gzip(make_tar(LAYER), damage))
    with pytest.raises(InvalidArgumentError, match="not a readable tar") as caught:
        unpack_layer(blob, workdir / "layer", "sha256:test", None)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("damage", GZIP_DAMAGE)
def test_a_damaged_gzip_blob_that_is_its_digest_is_refused_as_it_streams(
    workdir: Path, damage: str
) -> None:
    blob = damaged_gzip(make_tar(LAYER), damage)  # the registry's own blob, digest and all
    partial = workdir / "partial"
    with pytest.raises(InvalidArgumentError, match="not a readable tar"):
        stream(blob, partial, workdir / "layer", None)
    assert not partial.exists() and not (workdir / "layer").exists()


def test_a_resumed_blob_reads_what_the_partial_file_holds_first(workdir: Path) -> None:
    data = make_tar(LAYER)
    blob = compress(data, "gzip")
    partial = workdir / "partial"
    half = len(blob) // 2
    partial.write_bytes(blob[:half])  # an earlier pull broke off here
    received = stream(blob, partial, workdir / "layer", sha256(data), prefix=half)
    assert received == Received(sha256(blob), len(blob), True)
    assert partial.read_bytes() == blob
    assert (workdir / "layer/bin/tool").read_bytes() == LAYER[1].data


@pytest.mark.parametrize("damage", ["flipped byte", "other blob"])
def test_a_blob_that_is_not_its_digest_is_refused_and_nothing_is_kept(
    workdir: Path, damage: str
) -> None:
    data = make_tar(LAYER)
    blob = compress(data, "gzip")
    if damage == "flipped byte":
        sent = bytearray(blob)
        sent[len(sent) // 2] ^= 0xFF  # it may also fail to inflate: the digest is told first
        wrong = bytes(sent)
    else:
        wrong = compress(make_tar([Entry("f", "file", b"x" * len(blob))]), "none")[: len(blob)]
    partial = workdir / "partial"
    received = stream(wrong, partial, workdir / "layer", sha256(data), expected=sha256(blob))
    assert received.digest != sha256(blob) and not received.unpacked
    assert not partial.exists()
    assert not (workdir / "layer").exists()


def test_a_blob_that_matches_but_does_not_unpack_is_refused_and_nothing_is_kept(
    workdir: Path,
) -> None:
    blob = compress(make_tar([Entry("../escape", "file", b"x")]), "gzip")
    partial = workdir / "partial"
    with pytest.raises(InvalidArgumentError, match="climbs out"):
        stream(blob, partial, workdir / "layer", None)
    assert not partial.exists() and not (workdir / "layer").exists()
    assert not (workdir / "escape").exists()


def test_an_abandoned_download_keeps_its_partial_file_and_drops_the_tree(workdir: Path) -> None:
    blob = make_tar(LAYER)
    partial = workdir / "partial"
    with pytest.raises(PipeAbortedError):
        stream(blob, partial, workdir / "layer", sha256(blob), abort_after=1_000_000)
    kept = partial.read_bytes()
    assert 0 < len(kept) <= 1_000_000 and blob.startswith(kept)  # a valid prefix to resume
    assert not (workdir / "layer").exists()


def test_a_blob_without_a_destination_is_only_stored(workdir: Path) -> None:
    blob = b"\x00asm\x01\x00\x00\x00" + os.urandom(1000)  # WebAssembly: never untarred
    partial = workdir / "partial"
    assert stream(blob, partial, workdir / "layer", None) == Received(sha256(blob), 1008, False)
    assert partial.read_bytes() == blob and not (workdir / "layer").exists()


def test_the_pipe_holds_at_most_its_limit_until_the_reader_takes_some() -> None:
    async def run() -> list[str]:
        pipe = Pipe(limit=10)
        events: list[str] = []
        await pipe.write(b"0123456789")  # fills it
        waiting = asyncio.create_task(pipe.write(b"more"))
        await asyncio.sleep(0)
        events.append("blocked" if not waiting.done() else "not blocked")
        taken = await asyncio.to_thread(pipe.read, 4)
        await waiting
        events.append(f"took {taken.decode()}, then wrote")
        pipe.end()
        rest = b""
        while chunk := await asyncio.to_thread(pipe.read, 100):
            rest += chunk
        events.append(rest.decode())
        return events

    assert asyncio.run(run()) == ["blocked", "took 0123, then wrote", "456789more"]
