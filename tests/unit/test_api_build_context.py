"""apid's build context: the uploaded tar put under one top directory for registryd's
Receive (daemons/registryd/received.py, the real one), and what is refused before it."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest

from daemons.apid.routes_images import _Refused, wrap_context
from daemons.registryd.received import ReceivedFiles


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def received_context(tmp_path: Path, upload: bytes, limit: int = 1 << 20) -> Path:
    """``upload`` wrapped as apid does, then received by registryd's own code."""
    files = ReceivedFiles(tmp_path / "received")
    files.reset()
    with tempfile.TemporaryFile() as wrapped:
        wrap_context(io.BytesIO(upload), wrapped, limit)
        wrapped.seek(0)
        return Path(files.receive(os.dup(wrapped.fileno())))


def test_a_context_arrives_under_one_directory_with_links_and_dirs(tmp_path: Path) -> None:
    upload = tar_of(
        (entry("./", tarfile.DIRTYPE), None),
        (entry("./Dockerfile"), b"FROM scratch\n"),
        (entry("src", tarfile.DIRTYPE), None),
        (entry("src/app.py"), b"print(1)\n"),
        (entry("src/same.py", tarfile.LNKTYPE, "src/app.py"), None),
        (entry("python", tarfile.SYMTYPE, "/usr/bin/python3"), None),
    )
    context = received_context(tmp_path, upload)
    assert context.name == "context"
    assert (context / "Dockerfile").read_text() == "FROM scratch\n"
    assert (context / "src" / "same.py").stat().st_ino == (context / "src/app.py").stat().st_ino
    assert os.readlink(context / "python") == "/usr/bin/python3"


def test_a_gzipped_context_is_read_too(tmp_path: Path) -> None:
    upload = gzip.compress(tar_of((entry("Dockerfile"), b"FROM scratch\n")))
    assert (received_context(tmp_path, upload) / "Dockerfile").read_bytes() == b"FROM scratch\n"


@pytest.mark.parametrize(
    ("member", "sentence"),
    [
        (entry("../evil"), "../evil points outside the context ('..')"),
        (entry("a/../../evil"), "a/../../evil points outside the context ('..')"),
        (entry("/etc/cron.d/evil"), "/etc/cron.d/evil points outside the context (an absolute"),
        (entry("tty", tarfile.CHRTYPE), "tty is a device or a named pipe"),
        (entry("disk", tarfile.BLKTYPE), "disk is a device or a named pipe"),
        (entry("fifo", tarfile.FIFOTYPE), "fifo is a device or a named pipe"),
        (entry("shadow", tarfile.LNKTYPE, "../../etc/shadow"), "../../etc/shadow points outside"),
        (entry("shadow", tarfile.LNKTYPE, "/etc/shadow"), "/etc/shadow points outside"),
    ],
)
def test_hostile_members_are_refused_with_their_name(
    member: tarfile.TarInfo, sentence: str
) -> None:
    upload = tar_of((entry("Dockerfile"), b"FROM scratch\n"), (member, None))
    with pytest.raises(_Refused) as refused, tempfile.TemporaryFile() as out:
        wrap_context(io.BytesIO(upload), out, 1 << 20)
    assert sentence in str(refused.value)


def test_more_than_the_limit_or_not_a_tar_is_refused() -> None:
    upload = tar_of((entry("a"), b"x" * 600), (entry("b"), b"y" * 600))
    with pytest.raises(_Refused, match="holds more than"), tempfile.TemporaryFile() as out:
        wrap_context(io.BytesIO(upload), out, 1000)
    with pytest.raises(_Refused, match="not a complete tar"), tempfile.TemporaryFile() as out:
        wrap_context(io.BytesIO(b"this is not a tar archive" * 40), out, 1000)
