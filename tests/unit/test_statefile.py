"""shared.statefile: a crash never leaves half a state file, and a bad one is moved aside."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from shared.statefile import (
    StateFormatError,
    move_aside,
    read_state,
    remove_leftovers,
    write_atomically,
)

REPO = Path(__file__).resolve().parents[2]


def parse_allocations(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != 1:
        raise StateFormatError("not an allocations file of version 1")
    return data


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "state" / "allocations.json"
    write_atomically(path, json.dumps({"version": 1, "n": 1}))
    assert read_state(path, parse_allocations) == {"version": 1, "n": 1}
    write_atomically(path, json.dumps({"version": 1, "n": 2}).encode())
    assert read_state(path, parse_allocations) == {"version": 1, "n": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["allocations.json"]


def test_a_missing_file_is_nothing_and_not_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert read_state(tmp_path / "none.json", parse_allocations) is None
    assert caplog.records == []


def test_a_crash_between_write_and_rename_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "allocations.json"
    write_atomically(path, json.dumps({"version": 1, "n": "old"}))
    # A writer killed (SIGKILL, no clean-up of any kind) once its data is
    # written and synced, just before the rename.
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from shared import statefile
        os.rename = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        statefile.write_atomically(Path({str(path)!r}), '{{"version": 1, "n": "new"}}')
        """
    )
    died = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert died.returncode == -9, died.stderr
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and json.loads(leftovers[0].read_text())["n"] == "new"
    assert read_state(path, parse_allocations) == {"version": 1, "n": "old"}
    assert remove_leftovers(path) == leftovers
    assert list(tmp_path.iterdir()) == [path]
    # A directory of state files: every writer's leftovers in it, nothing else.
    subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    other = tmp_path / "other.json"
    write_atomically(other, "{}")
    assert len(remove_leftovers(tmp_path)) == 1
    assert sorted(tmp_path.iterdir()) == [path, other]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"version": 1, "allocations": {"a": {"addr', "Unterminated string"),
        (b"\x00\x9f\xff garbage", "invalid start byte"),
        (b'{"version": 7}', "not an allocations file of version 1"),
        (b"[1, 2]", "not an allocations file"),
        (b"", "it is empty"),
    ],
)
def test_an_unusable_file_is_moved_aside_and_read_as_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    path = tmp_path / "allocations.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        found = read_state(path, parse_allocations, "rebuilding the allocations")
    assert found is None
    assert not path.exists()
    (aside,) = tmp_path.glob("allocations.json.corrupt-*")
    assert aside.read_bytes() == content  # kept for a person to look at
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert str(path) in message and str(aside) in message
    assert reason in message and "rebuilding the allocations" in message
    # The next start finds nothing to trip on, and a new file is written as usual.
    assert read_state(path, parse_allocations) is None
    write_atomically(path, '{"version": 1}')
    assert read_state(path, parse_allocations) == {"version": 1}


def test_moving_aside_twice_in_one_second_keeps_both(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_text("first")
    first = move_aside(path)
    path.write_text("second")
    second = move_aside(path)
    assert first != second
    assert first.read_text() == "first" and second.read_text() == "second"


def test_a_file_that_cannot_be_read_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.mkdir()  # reading it fails with EISDIR
    assert read_state(path, json.loads) is None
    assert not path.exists() and len(list(tmp_path.glob("routes.json.corrupt-*"))) == 1


def test_modes_are_kept_or_set(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.json"
        write_atomically(fresh, "{}")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        secret = tmp_path / "auth.json"
        write_atomically(secret, "{}", mode=0o600)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        write_atomically(secret, '{"auths": {}}')  # no mode: the file's own is kept
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        os.chmod(fresh, 0o640)
        write_atomically(fresh, "[]")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "traffic.json"
    write_atomically(path, "old")
    with pytest.raises(IsADirectoryError):
        (tmp_path / "sub").mkdir()
        write_atomically(tmp_path / "sub", "new")  # rename onto a directory fails
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "traffic.json"]
