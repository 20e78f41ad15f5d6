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

from datetime import timedelta

from shared.userfile import FileReadError, format_bytes
from shared.userfile import read_regular_file as _read_regular_file

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


def read_regular_file(path: str, limit: int = MAX_SPEC_BYTES) -> bytes:
    """At most ``limit`` bytes of the spec file at ``path`` (see shared.userfile)."""
    return _read_regular_file(
        path, limit, "spec file", too_large_advice="split it into several deployments"
    )
