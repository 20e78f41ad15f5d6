"""Reading a file a user names (a spec, a ZImagefile, a ZPipeline) within a bound.

What a user passes as FILE may be a FIFO with no writer, a device such as
/dev/zero or a file of gigabytes: reading must neither block nor grow without
bound. Only the standard library here, so the CLI reads a file before it
loads anything heavier.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["FileReadError", "format_bytes", "read_regular_file"]


class FileReadError(Exception):
    """A file that cannot be read; the message completes "FILE: ..."."""


def read_regular_file(
    path: str, limit: int, what: str = "spec file", too_large_advice: str = ""
) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``.

    Anything else (a FIFO, a device, a socket) is refused without reading from
    it, and so is a file larger than ``limit``. ``what`` names the kind of file
    in the sentences ("spec file", "ZImagefile").
    """
    not_regular = (
        "is not a regular file (a pipe, a device or a socket); "
        f"save the {what.removesuffix(' file')} to a file and name that"
    )
    try:
        # Opened without blocking: a FIFO with no writer would otherwise hang here.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileReadError("no such file") from None
    except IsADirectoryError:
        raise FileReadError(f"is a directory, not a {what}") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket
            raise FileReadError(not_regular) from None
        raise FileReadError(f"cannot read: {exc.strerror or type(exc).__name__}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FileReadError(f"is a directory, not a {what}")
        if not stat.S_ISREG(mode):
            raise FileReadError(not_regular)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise FileReadError(f"cannot read: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > limit:
        advice = f"; {too_large_advice}" if too_large_advice else ""
        raise FileReadError(
            f"is larger than {format_bytes(limit)}, the most a {what} may hold{advice}"
        )
    return raw


def format_bytes(count: int) -> str:
    """``1048576`` -> ``1 MiB``, for sentences about limits."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"
