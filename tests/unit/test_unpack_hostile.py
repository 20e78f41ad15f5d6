"""registryd's layer unpacker against hostile layers: whiteouts that name the layer directory
or its parent, decompression bombs, oversized headers, values out of range, and a hypothesis
fuzz test of hostile tar streams. Whatever a layer holds, unpacking ends in a LayerError or a
tree inside the unpack directory, and nothing beside that directory changes."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.registryd.unpack import MAX_SPECIAL_HEADER, LayerError, unpack_layer
from shared.busybox_image import Compression, Entry, compress, make_tar

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="owners, devices and whiteouts need root")


@pytest.fixture
def store_tmp() -> Iterator[Path]:
    """A store's tmp/: another pull's partial download and unpacked layer beside ours."""
    with tempfile.TemporaryDirectory(prefix="zlhostile-") as name:
        tmp = Path(name) / "tmp"
        tmp.mkdir()
        (tmp / "blob-other").write_bytes(b"another pull's download")
        (tmp / "unpack-other").mkdir()
        (tmp / "unpack-other" / "kept").write_bytes(b"another layer")
        yield tmp


def siblings(tmp: Path) -> dict[str, bytes]:
    """What lies beside the unpack directory, by path: a file's content, else its mode."""
    found: dict[str, bytes] = {}
    for path in sorted(tmp.rglob("*")):
        if path == tmp / "layer" or tmp / "layer" in path.parents:
            continue
        info = os.lstat(path)
        found[str(path.relative_to(tmp))] = (
            path.read_bytes()
            if stat.S_ISREG(info.st_mode)
            else stat.filemode(info.st_mode).encode()
        )
    return found


def unpack_blob(tmp: Path, blob: bytes, limit: int | None = None) -> Path:
    (tmp.parent / "blob").write_bytes(blob)
    dest = tmp / "layer"
    extra = {} if limit is None else {"max_unpacked": limit}
    unpack_layer(tmp.parent / "blob", dest, "sha256:hostile", None, **extra)
    return dest


# ---------------------------------------------------------------- whiteouts


@root_only
@pytest.mark.parametrize(
    "name",
    [".wh...", ".wh..", ".wh.", "./.wh...", "sub/.wh...", "sub/.wh..", "sub/.wh."],
)
def test_a_whiteout_naming_dot_dotdot_or_nothing_is_refused(store_tmp: Path, name: str) -> None:
    before = siblings(store_tmp)
    blob = make_tar([Entry("sub", "dir"), Entry("sub/f", "file", b"f"), Entry(name, "file")])
    with pytest.raises(LayerError) as caught:
        unpack_blob(store_tmp, blob)
    message = str(caught.value)
    assert name in message and "whiteout" in message and "\n" not in message
    # Neither the store's tmp/ (with another pull's files) nor the layer directory
    # itself was removed or replaced by a device node.
    assert siblings(store_tmp) == before
    assert stat.S_ISDIR(os.lstat(store_tmp / "layer").st_mode)
    assert stat.S_ISDIR(os.lstat(store_tmp / "layer" / "sub").st_mode)


@root_only
def test_ordinary_whiteouts_still_hide_files(store_tmp: Path) -> None:
    dest = unpack_blob(
        store_tmp,
        make_tar([Entry("a", "dir"), Entry("a/.wh.b", "file"), Entry(".wh.c", "file")]),
    )
    assert os.lstat(dest / "a" / "b").st_rdev == os.makedev(0, 0)
    assert stat.S_ISCHR(os.lstat(dest / "c").st_mode)


# ---------------------------------------------------------------- sizes


def _zeros_tar(size: int) -> bytes:
    """A tar holding one file of ``size`` zero bytes, built without holding it in memory twice."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return out.getvalue()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_decompression_bomb_stops_at_the_limit(store_tmp: Path, compression: str) -> None:
    data = _zeros_tar(64 << 20)
    blob = gzip.compress(data, 9) if compression == "gzip" else zstandard.compress(data, 19)
    assert len(blob) < 1 << 20  # a small download...
    before = siblings(store_tmp)
    with pytest.raises(LayerError) as caught:
        unpack_blob(store_tmp, blob, limit=4 << 20)  # ...that unpacks to 16 times the limit
    message = str(caught.value)
    assert "more than 4 MiB" in message and "max_layer_unpacked_size" in message
    assert siblings(store_tmp) == before
    written = sum(p.stat().st_size for p in (store_tmp / "layer").rglob("*") if p.is_file())
    assert written <= 4 << 20


def test_a_layer_within_the_limit_unpacks(store_tmp: Path) -> None:
    dest = unpack_blob(store_tmp, gzip.compress(_zeros_tar(1 << 20)), limit=2 << 20)
    assert (dest / "zeros").stat().st_size == 1 << 20


def test_a_sparse_file_counts_its_holes(store_tmp: Path) -> None:
    """An old GNU sparse member: a few bytes in the archive, a gibibyte on disk."""
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    # One sparse map entry: 512 bytes of data at offset 1 GiB, after a hole of 1 GiB.
    header[386:398] = b"%011o\0" % (1 << 30)
    header[398:410] = b"%011o\0" % 512
    header[483:495] = b"%011o\0" % ((1 << 30) + 512)
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    blob = bytes(header) + b"x" * 512 + bytes(1024)
    with pytest.raises(LayerError, match="more than 1 MiB"):
        unpack_blob(store_tmp, blob, limit=1 << 20)


def test_a_sparse_map_longer_than_its_data_is_a_tar_that_cannot_be_read(
    store_tmp: Path,
) -> None:
    """Its map points past the member's data into the next header: reading it would go
    back over what was read. The layer's fault, not the store's."""
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % 0  # one map entry: 2048 bytes of data at offset 0
    header[398:410] = b"%011o\0" % 2048
    header[483:495] = b"%011o\0" % 2048
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    after = make_tar([Entry(name, "file", b"xyz") for name in ("a", "b", "c", "d")])
    blob = bytes(header) + b"s" * 512 + after
    before = siblings(store_tmp)
    with pytest.raises(LayerError, match="is not a readable tar"):
        unpack_blob(store_tmp, blob)
    assert siblings(store_tmp) == before


def test_a_huge_pax_header_is_refused_before_it_is_read(store_tmp: Path) -> None:
    info = tarfile.TarInfo("big")
    info.pax_headers = {"comment": "x" * (MAX_SPECIAL_HEADER + 10)}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(LayerError, match=r"not a readable tar .*a header of 1 MiB"):
        unpack_blob(store_tmp, out.getvalue())


def _old_gnu_sparse_map(blocks: int) -> bytes:
    """An old GNU sparse member whose map runs on for ``blocks`` extension blocks."""
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[482] = 1  # extension blocks follow
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    entry = b"%011o\0" % 1 + b"%011o\0" % 1
    extension = bytearray(entry * 21 + bytes(512 - 21 * 24))
    extension[504] = 1  # and another
    return bytes(header) + bytes(extension) * blocks


def _sparse_1_0_map(entries: int) -> bytes:
    """A PAX GNU sparse 1.0 member whose map, before its data, lists ``entries`` pieces."""
    data = b"%d\n" % entries + b"1\n1\n" * entries
    info = tarfile.TarInfo("sparse")
    info.size = len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "sparse",
        "GNU.sparse.realsize": str(entries),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(
    "blob",
    [_old_gnu_sparse_map(40_000), _sparse_1_0_map(4_000_000)],
    ids=["old GNU map", "GNU 1.0 map"],
)
def test_a_sparse_map_without_end_is_refused_before_it_fills_memory(
    store_tmp: Path, blob: bytes
) -> None:
    """20 MB of map would be held as hundreds of MB of Python tuples: 4 MiB is the bound."""
    with pytest.raises(LayerError, match=r"not a readable tar \(headers of more than 4 MiB"):
        unpack_blob(store_tmp, gzip.compress(blob, 1))


@root_only
@pytest.mark.parametrize(
    ("pax", "says"),
    [
        ({"uid": str(1 << 40)}, "'f' with a value out of range"),
        ({"mtime": "1e300"}, "'f' with a value out of range"),
        ({"SCHILY.xattr.security.capability": "bogus"}, "'f' that cannot be unpacked"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_entry(
    store_tmp: Path, pax: dict[str, str], says: str
) -> None:
    info = tarfile.TarInfo("f")
    info.pax_headers = pax
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(LayerError) as caught:
        unpack_blob(store_tmp, out.getvalue())
    assert says in str(caught.value) and "sha256:hostile" in str(caught.value)


def test_a_name_too_long_for_the_file_system_is_a_layer_error(store_tmp: Path) -> None:
    with pytest.raises(LayerError, match=r"cannot be unpacked .*name too long"):
        unpack_blob(store_tmp, make_tar([Entry("n" * 300, "file", b"x")]))


# ---------------------------------------------------------------- fuzz

NAME_PARTS = st.sampled_from(
    ["a", "b", "c", ".", "..", "", ".wh.a", ".wh..", ".wh...", ".wh.", ".wh..wh..opq", "sub"]
)
NAMES = st.one_of(
    st.lists(NAME_PARTS, min_size=1, max_size=4).map("/".join),
    st.lists(NAME_PARTS, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12),
)
Kind = Literal["dir", "file", "symlink", "hardlink", "char", "block", "fifo"]
KINDS: st.SearchStrategy[Kind] = st.sampled_from(
    ["dir", "file", "symlink", "hardlink", "char", "block", "fifo"]
)
TARGETS = st.one_of(
    NAMES, st.sampled_from(["..", "../..", "/", "/etc/passwd", "../outside", "a", "sub/a"])
)


@st.composite
def hostile_entries(draw: st.DrawFn) -> list[Entry]:
    entries = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(KINDS)
        entries.append(
            Entry(
                draw(NAMES),
                kind,
                data=draw(st.binary(max_size=64)) if kind == "file" else b"",
                mode=draw(st.integers(0, 0o7777)),
                uid=draw(st.sampled_from([0, 1000, 65534])),
                target=draw(TARGETS) if kind in ("symlink", "hardlink") else "",
                devmajor=draw(st.integers(0, 8)),
                devminor=draw(st.integers(0, 8)),
            )
        )
    if draw(st.booleans()):  # a name given twice, as another kind
        again = draw(st.sampled_from(entries))
        entries.append(Entry(again.name, draw(KINDS), target="a"))
    return entries


def _bomb(limit: int) -> bytes:
    return gzip.compress(_zeros_tar(limit * 4), 9)


@root_only
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    entries=hostile_entries(),
    compression=st.sampled_from(get_args(Compression)),
    cut=st.one_of(st.none(), st.integers(0, 4096)),
    flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=4),
    bomb=st.booleans(),
)
def test_hostile_tar_streams_end_in_a_layer_error_or_a_tree_inside(
    entries: list[Entry],
    compression: Compression,
    cut: int | None,
    flips: list[tuple[int, int]],
    bomb: bool,
) -> None:
    limit = 256 << 10
    with tempfile.TemporaryDirectory(prefix="zlfuzz-") as name:
        tmp = Path(name) / "tmp"
        tmp.mkdir()
        (tmp / "blob-other").write_bytes(b"another pull's download")
        (tmp / "unpack-other").mkdir()
        (tmp / "unpack-other" / "kept").write_bytes(b"another layer")
        before = siblings(tmp)
        try:
            data = make_tar(entries)
        except (ValueError, UnicodeError, tarfile.TarError):
            return  # not even tarfile can write it
        if cut is not None:
            data = data[: min(cut, len(data))]
        if flips and data:  # headers and maps damaged: what tarfile makes of them
            damaged = bytearray(data)
            for position, value in flips:
                damaged[position % len(damaged)] = value
            data = bytes(damaged)
        blob = _bomb(limit) if bomb else compress(data, compression)
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                unpack_blob(tmp, blob, limit=limit)
                outcome.append(None)
            except BaseException as exc:  # told below
                outcome.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "unpacking hung"
        problem = outcome[0]
        assert problem is None or isinstance(problem, LayerError), repr(problem)
        if problem is not None:
            assert "\n" not in str(problem)
        # Nothing beside the unpack directory changed, and it is still a directory.
        assert siblings(tmp) == before
        assert stat.S_ISDIR(os.lstat(tmp / "layer").st_mode)
        assert sorted(os.listdir(Path(name))) == ["blob", "tmp"]
        # No file in the layer is a hard link to one outside it, or larger than the limit.
        outside = {os.lstat(p).st_ino for p in tmp.rglob("*") if tmp / "layer" not in p.parents}
        for path in (tmp / "layer").rglob("*"):
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                assert info.st_ino not in outside and info.st_size <= limit
    assert not any(os.path.lexists(f"/{top}") for top in ("a", "b", "c", "sub", ".wh.a"))
