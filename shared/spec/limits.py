"""How large a deployment spec may be, and reading a user's file within that bound.

Owns the limits every reader of a spec applies, so that ``zlayerctl
validate`` and schedd (which parses specs sent over the bus) refuse the same
things: the size of the text, the YAML events and nodes, the nesting, the
number of services, replicas and chained ``depends``, the largest size and
duration a field may hold. Each limit is far above what a real deployment
needs and low enough that a hostile file is refused in well under a second
with bounded memory.

Nothing here imports more than the standard library, so a daemon can check
the size of a spec before it loads the spec models.
"""

from __future__ import annotations

import errno
import os
import stat
from datetime import timedelta

__all__ = [
    "MAX_DEPENDS_CHAIN",
    "MAX_DEPTH",
    "MAX_DURATION",
    "MAX_EVENTS",
    "MAX_ISSUES",
    "MAX_NODES",
    "MAX_REPLICAS",
    "MAX_SERVICES",
    "MAX_SIZE",
    "MAX_SPEC_BYTES",
    "FileReadError",
    "format_bytes",
    "read_regular_file",
]

MAX_SPEC_BYTES = 1 << 20
"""The largest spec text accepted (1 MiB): from a file, or over the bus."""

MAX_EVENTS = 100_000
"""YAML events (scalars, collection starts and ends), counted while parsing."""

MAX_NODES = 100_000
"""Values built from the document, aliases expanded: stops alias bombs ("billion laughs")."""

MAX_DEPTH = 100
"""Collections nested in one another, counted while parsing."""

MAX_SERVICES = 1000
"""Services in one deployment."""

MAX_REPLICAS = 1000
"""Replicas of one service (``scale.replicas``, ``scale.max``)."""

MAX_DEPENDS_CHAIN = 100
"""Services waiting on one another in a row through ``depends``."""

MAX_SIZE = 1024**6
"""The largest size a field may hold (1Ei)."""

MAX_DURATION = timedelta(days=365)
"""The longest duration a field may hold."""

MAX_ISSUES = 100
"""Problems described one by one; past this a spec's error says how many more there are."""


class FileReadError(Exception):
    """A file that cannot be read as a spec; the message completes "FILE: ..."."""


def read_regular_file(path: str, limit: int = MAX_SPEC_BYTES) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``.

    Anything else (a FIFO, a device such as /dev/zero, a socket) is refused
    without reading from it, and so is a file larger than ``limit``: reading
    neither blocks nor grows without bound.
    """
    try:
        # Opened without blocking: a FIFO with no writer would otherwise hang here.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileReadError("no such file") from None
    except IsADirectoryError:
        raise FileReadError("is a directory, not a spec file") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket
            raise FileReadError(_NOT_REGULAR) from None
        raise FileReadError(f"cannot read: {exc.strerror or type(exc).__name__}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FileReadError("is a directory, not a spec file")
        if not stat.S_ISREG(mode):
            raise FileReadError(_NOT_REGULAR)
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
        raise FileReadError(
            f"is larger than {format_bytes(limit)}, the most a spec file may hold; "
            "split it into several deployments"
        )
    return raw


_NOT_REGULAR = (
    "is not a regular file (a pipe, a device or a socket); save the spec to a file and name that"
)


def format_bytes(count: int) -> str:
    """``1048576`` -> ``1 MiB``, for sentences about limits."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"
