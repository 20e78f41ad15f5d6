"""registryd's Receive against hostile tar members, through a real pipe: names that climb out,
that name the destination itself, links written through, hard links that leave. Each is
refused with one sentence naming the member, or made harmless, and nothing outside the
received entry changes: not received/ itself, not a file beside it."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.registryd.received import ReceivedFiles
from shared.bus import SEND_COMPLETE, InvalidArgumentError


@pytest.fixture
def received(tmp_path: Path) -> ReceivedFiles:
    files = ReceivedFiles(tmp_path / "received")
    files.reset()
    return files


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file beside received/ that no stream may touch."""
    path = tmp_path / "victim"
    path.write_bytes(b"untouched")
    path.chmod(0o600)
    return path


def send_bytes(received: ReceivedFiles, data: bytes) -> str:
    read_fd, write_fd = os.pipe()

    def write() -> None:
        try:
            os.write(write_fd, data)
        except BrokenPipeError:
            pass  # refused early: registryd closed its end
        finally:
            os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return received.receive(read_fd)
    finally:
        writer.join()


def member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def stream(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue() + SEND_COMPLETE


def state(path: Path) -> tuple[int, int, int]:
    info = os.lstat(path)
    return info.st_mode, info.st_uid, info.st_gid


def test_a_member_climbing_out_of_a_directory_is_refused(
    received: ReceivedFiles, victim: Path
) -> None:
    """``a/../..`` passed the old check and set received/ to 0777, owned by 65534."""
    before = state(received.root), state(victim)
    climbing, _ = member("a/../..", tarfile.DIRTYPE, mode=0o777)
    climbing.uid = climbing.gid = 65534
    with pytest.raises(InvalidArgumentError) as caught:
        send_bytes(received, stream(member("a", tarfile.DIRTYPE), (climbing, b"")))
    message = str(caught.value)
    assert "a/../.. points outside what was sent ('..')" in message and "\n" not in message
    assert (state(received.root), state(victim)) == before
    assert os.listdir(received.root) == []


@pytest.mark.parametrize(
    "name",
    [".", "./", "a/..", "a/./../b", "a/b/../../../victim", "../victim", "/etc/zl-test", ""],
)
def test_names_that_are_the_destination_or_leave_it_are_refused(
    received: ReceivedFiles, victim: Path, name: str
) -> None:
    before = state(received.root), state(victim)
    with pytest.raises(InvalidArgumentError) as caught:
        send_bytes(
            received,
            stream(member("a", tarfile.DIRTYPE), member(name, tarfile.DIRTYPE, mode=0o777)),
        )
    shown = name.rstrip("/") or "''"
    assert f"{shown} points outside what was sent" in str(caught.value)
    assert (state(received.root), state(victim)) == before
    assert victim.read_bytes() == b"untouched" and not os.path.lexists("/etc/zl-test")
    assert os.listdir(received.root) == []


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.DIRTYPE], ids=["file", "dir"])
def test_a_member_after_a_link_of_the_same_name_replaces_the_link(
    received: ReceivedFiles, victim: Path, kind: bytes
) -> None:
    """tarfile opened a file, or chmod-ed a directory, through a link already in its place."""
    before = state(victim)
    path = send_bytes(
        received,
        stream(
            member("p", tarfile.DIRTYPE),
            member("p/l", tarfile.SYMTYPE, link=str(victim)),
            member("p/l", kind, b"replaced", mode=0o777),
        ),
    )
    assert victim.read_bytes() == b"untouched" and state(victim) == before
    placed = Path(path) / "l"
    assert not placed.is_symlink()
    if kind == tarfile.REGTYPE:
        assert placed.read_bytes() == b"replaced"
    else:
        assert stat.S_ISDIR(os.lstat(placed).st_mode)


@pytest.mark.parametrize(
    "link",
    ["p/out", "../victim", "p/../../victim", "/etc/passwd", ""],
)
def test_a_hard_link_whose_target_leaves_is_refused(
    received: ReceivedFiles, victim: Path, link: str
) -> None:
    before = os.lstat(victim).st_nlink
    with pytest.raises(InvalidArgumentError) as caught:
        send_bytes(
            received,
            stream(
                member("p", tarfile.DIRTYPE),
                member("p/out", tarfile.SYMTYPE, link=str(victim)),
                member("p/h", tarfile.LNKTYPE, link=link),
            ),
        )
    assert "p/h points outside what was sent" in str(caught.value)
    assert os.lstat(victim).st_nlink == before
    assert os.listdir(received.root) == []


def test_a_link_that_cannot_be_made_is_refused_not_retried_forever(
    received: ReceivedFiles,
) -> None:
    """``p/l/.`` is the directory ``p/l``: a link cannot take its place, and tarfile's
    fallback (extracting the member the link names: this one) recursed until RecursionError."""
    sent = stream(
        member("p", tarfile.DIRTYPE),
        member("p/l", tarfile.DIRTYPE),
        member("p/l/.", tarfile.SYMTYPE, link="/."),
    )
    with pytest.raises(InvalidArgumentError) as caught:
        send_bytes(received, sent)
    assert str(caught.value) == (
        "p/l/. is sent as a directory and as a link; move it out of the directory and try again"
    )
    assert os.listdir(received.root) == []


def test_links_inside_and_absolute_symlinks_are_kept(received: ReceivedFiles) -> None:
    path = Path(
        send_bytes(
            received,
            stream(
                member("p", tarfile.DIRTYPE),
                member("p/f", data=b"data"),
                member("p/h", tarfile.LNKTYPE, link="p/f"),
                member("p/python", tarfile.SYMTYPE, link="/usr/bin/python3"),
                member("p/./g", data=b"g"),
            ),
        )
    )
    assert os.lstat(path / "h").st_ino == os.lstat(path / "f").st_ino
    assert os.readlink(path / "python") == "/usr/bin/python3"
    assert (path / "g").read_bytes() == b"g"


def test_hostile_headers_are_refused_without_filling_memory(received: ReceivedFiles) -> None:
    huge = tarfile.TarInfo("p")
    huge.pax_headers = {"comment": "x" * (2 << 20)}  # read into memory whole, unbounded
    with pytest.raises(InvalidArgumentError, match=r"not a complete tar stream \(a header of 2"):
        send_bytes(received, stream((huge, b"")))
    sparse = tarfile.TarInfo("p")
    sparse.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(sparse.tobuf(tarfile.GNU_FORMAT))
    header[482] = 1  # a sparse map continues in the next block, which is missing
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(InvalidArgumentError, match="not a complete tar stream"):
        send_bytes(received, bytes(header))
    assert os.listdir(received.root) == []


def test_a_symbolic_link_as_the_top_entry_is_refused(received: ReceivedFiles) -> None:
    """Received as a build context or an archive, it would make registryd read what it names."""
    with pytest.raises(InvalidArgumentError) as caught:
        send_bytes(received, stream(member("ctx", tarfile.SYMTYPE, link="/root")))
    assert str(caught.value) == (
        "what was sent is a symbolic link (ctx -> /root); send the file or directory it points to"
    )
    assert os.listdir(received.root) == []


PARTS = st.sampled_from(["p", "q", "l", ".", "..", "", "victim"])
NAMES = st.one_of(
    st.lists(PARTS, min_size=1, max_size=4).map("/".join),
    st.lists(PARTS, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
)
KINDS = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
)


@settings(max_examples=200, deadline=None)
@given(
    members=st.lists(
        st.tuples(NAMES, KINDS, st.one_of(NAMES, st.just("{victim}")), st.integers(0, 0o7777)),
        min_size=1,
        max_size=8,
    )
)
def test_hostile_streams_change_nothing_outside_the_entry(
    members: list[tuple[str, bytes, str, int]],
) -> None:
    with tempfile.TemporaryDirectory(prefix="zlrecv-") as name:
        base = Path(name)
        files = ReceivedFiles(base / "received")
        files.reset()
        victim = base / "victim"
        victim.write_bytes(b"untouched")
        victim.chmod(0o600)
        before = state(files.root), state(victim), state(base), os.lstat(victim).st_nlink
        sent = [
            member(n, kind, b"data", link.format(victim=victim), mode)
            for n, kind, link, mode in members
        ]
        try:
            files.release(send_bytes(files, stream(*sent)))
        except InvalidArgumentError as exc:
            assert "\n" not in str(exc)
        after = state(files.root), state(victim), state(base), os.lstat(victim).st_nlink
        assert after == before and victim.read_bytes() == b"untouched"
        assert sorted(os.listdir(base)) == ["received", "victim"]
        assert os.listdir(files.root) == []
