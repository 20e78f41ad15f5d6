"""registryd's received files (daemons/registryd/received.py) fed by zlayerctl's sender
(ctl/transfer.py) through real pipes: what is kept, what is refused, what is swept."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from ctl.transfer import _write_tar
from daemons.registryd.received import UNUSED_TTL_SEC, ReceivedFiles
from shared.bus import SEND_COMPLETE, InvalidArgumentError


@pytest.fixture
def received(tmp_path: Path) -> ReceivedFiles:
    files = ReceivedFiles(tmp_path / "received")
    files.reset()
    return files


def send(received: ReceivedFiles, path: Path) -> str:
    """What zlayerctl does, through a real pipe; registryd's path."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []
    writer = threading.Thread(
        target=_write_tar, args=(str(path), write_fd, failure, threading.Event())
    )
    writer.start()
    try:
        return received.receive(read_fd)
    finally:
        writer.join()
        assert failure == []


def send_bytes(received: ReceivedFiles, data: bytes) -> str:
    read_fd, write_fd = os.pipe()
    writer = threading.Thread(target=lambda: os.write(write_fd, data) and os.close(write_fd))
    writer.start()
    try:
        return received.receive(read_fd)
    finally:
        writer.join()


def test_a_directory_arrives_whole_with_modes_and_links(
    received: ReceivedFiles, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print(1)\n")
    (project / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(project / "run.sh", 0o755)
    os.symlink("/usr/bin/python3", project / "python")  # absolute: kept as a link
    big = os.urandom(3 * 1024 * 1024)
    (project / "blob.bin").write_bytes(big)

    path = Path(send(received, project))
    assert path.name == "project" and path.parent.parent == received.root
    assert (path / "src" / "main.py").read_text() == "print(1)\n"
    assert os.stat(path / "run.sh").st_mode & 0o777 == 0o755
    assert os.readlink(path / "python") == "/usr/bin/python3"
    assert (path / "blob.bin").read_bytes() == big

    received.claim(str(path))
    received.release(str(path))
    assert os.listdir(received.root) == []


def test_a_single_file_arrives_under_its_own_name(received: ReceivedFiles, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"x" * 1000)
    path = Path(send(received, archive))
    assert path.name == "image.tar" and path.read_bytes() == b"x" * 1000


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_a_stream_cut_short_is_refused_and_nothing_kept(received: ReceivedFiles) -> None:
    whole = _tar(_file("project/a", b"a" * 600))
    with pytest.raises(InvalidArgumentError, match="stopped before the end"):
        send_bytes(received, whole)  # a complete tar, but no mark after it
    with pytest.raises(InvalidArgumentError, match="not a complete tar stream"):
        send_bytes(received, whole[:700])
    assert os.listdir(received.root) == []
    assert Path(send_bytes(received, whole + SEND_COMPLETE)).name == "project"


def test_hostile_members_are_refused(received: ReceivedFiles, tmp_path: Path) -> None:
    outside = tarfile.TarInfo("project/shadow")
    outside.type = tarfile.LNKTYPE
    outside.linkname = "../../../etc/shadow"
    with pytest.raises(InvalidArgumentError, match="points outside what was sent"):
        send_bytes(received, _tar(_file("project/a", b"a"), (outside, None)) + SEND_COMPLETE)
    escape = _file("../escape", b"x")
    with pytest.raises(InvalidArgumentError, match="points outside what was sent"):
        send_bytes(received, _tar(escape) + SEND_COMPLETE)
    through = tarfile.TarInfo("project/etc")
    through.type = tarfile.SYMTYPE
    through.linkname = str(tmp_path)
    written_through = _tar((through, None), _file("project/etc/planted", b"x")) + SEND_COMPLETE
    with pytest.raises(InvalidArgumentError, match="project/etc/planted points outside"):
        send_bytes(received, written_through)
    assert not (tmp_path / "planted").exists()
    fifo = tarfile.TarInfo("project/pipe")
    fifo.type = tarfile.FIFOTYPE
    with pytest.raises(InvalidArgumentError, match="project/pipe is a device or a named pipe"):
        send_bytes(received, _tar((fifo, None)) + SEND_COMPLETE)
    two = _tar(_file("one", b"1"), _file("two", b"2")) + SEND_COMPLETE
    with pytest.raises(InvalidArgumentError, match="2 top-level entries, not one"):
        send_bytes(received, two)
    assert os.listdir(received.root) == []
    assert not (tmp_path / "escape").exists()


def test_unused_entries_are_swept_but_claimed_ones_stay(
    received: ReceivedFiles, tmp_path: Path
) -> None:
    source = tmp_path / "ctx"
    source.mkdir()
    forgotten = Path(send(received, source))
    in_use = Path(send(received, source))
    received.claim(str(in_use))
    old = time.time() - UNUSED_TTL_SEC - 60
    for path in (forgotten.parent, in_use.parent):
        os.utime(path, (old, old))
    fresh = Path(send(received, source))  # each receive sweeps first
    assert not forgotten.exists()
    assert in_use.exists() and fresh.exists()
    received.release(str(tmp_path / "not-ours"))  # someone else's path: left alone
    assert source.exists()
