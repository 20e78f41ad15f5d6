"""libc's calls that Python's ``os`` lacks (mount, umount2, unshare, setns, prctl,
raw syscalls), through one ctypes handle loaded with its first use.

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
