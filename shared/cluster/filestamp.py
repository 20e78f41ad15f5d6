"""Whether a node's TLS files changed since they were read, and whether the change has
settled: a renewal writes the new key, then the new certificate, over the old ones
(:meth:`shared.cluster.pki.ClusterFiles.write_node`), and a reader between the two
writes would pair a key with a certificate that is not its own.

Standard library only: the etcd wrapper process and the clients import it.
"""

from __future__ import annotations

import time
from pathlib import Path

# A file that changed less than this long ago may be half of a renewal; its reader
# keeps the files it read before and looks again later.
SETTLE_SECONDS = 1.0


def stamp(*paths: Path) -> tuple[int, ...]:
    """Blocking: the modification times (ns) of ``paths``; OSError if one is missing."""
    return tuple(path.stat().st_mtime_ns for path in paths)


def settled(files_stamp: tuple[int, ...], now_ns: int | None = None) -> bool:
    """Whether the newest of the files stamped changed at least SETTLE_SECONDS ago."""
    now = time.time_ns() if now_ns is None else now_ns
    return not files_stamp or now - max(files_stamp) >= SETTLE_SECONDS * 1e9
