"""libc's calls that Python's ``os`` lacks (mount, umount2, unshare, setns, prctl,
syncfs, raw syscalls), through one ctypes handle loaded with its first use.

ctypes costs a daemon that never needs it about half a MiB, so nothing is loaded
at import. A caller that forks and calls in the child before exec loads the
handle in the parent first (an import in a forked child can deadlock).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library of this process; each call keeps its errno (:func:`last_errno`)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def last_errno() -> int:
    """The errno the calling thread's last libc call through :func:`libc` left."""
    import ctypes

    return ctypes.get_errno()


def check(result: int, what: str) -> None:
    """OSError (its errno, ``what: strerror``) when a libc call returned non-zero."""
    if result != 0:
        err = last_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def syncfs(path: str | os.PathLike[str]) -> None:
    """Write the file system that holds ``path`` to disk (syncfs(2), blocking).

    The durability of ``os.sync()`` for that one file system, without
    waiting for every other file system's writeback on the machine.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        check(libc().syncfs(fd), f"syncfs of {os.fspath(path)}")
    finally:
        os.close(fd)
