"""shared.libc: its calls answer as the kernel does, and a failure is an OSError with errno."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from shared.libc import check, libc, syncfs


def test_syncfs_writes_a_directorys_file_system_and_refuses_what_is_not_one(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_bytes(b"x")
    syncfs(tmp_path)  # returns once written; nothing to see but that it does not fail
    with pytest.raises(OSError) as missing:
        syncfs(tmp_path / "absent")
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(OSError) as not_dir:
        syncfs(tmp_path / "file")
    assert not_dir.value.errno == errno.ENOTDIR


def test_check_turns_a_failed_call_into_its_errno() -> None:
    result = libc().syncfs(-1)  # a descriptor nobody has
    with pytest.raises(OSError, match="syncfs of nothing: Bad file descriptor") as caught:
        check(result, "syncfs of nothing")
    assert caught.value.errno == errno.EBADF
    check(libc().getpid() - os.getpid(), "getpid")  # 0: no error
