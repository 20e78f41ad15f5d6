"""What proxyd refuses to hostile or overloaded clients, and how it says so.

The limits themselves are settings (``max_head_size``, ``max_headers``,
``request_head_timeout``, ``max_connections``, ``udp_max_sessions``); this
module holds what the listeners share to apply them.
"""

from __future__ import annotations

import logging
import time

from daemons.proxyd.metrics import CONNECTIONS_REFUSED

log = logging.getLogger("zlayer.proxyd")

WARN_EVERY = 60.0  # seconds between two warnings about one full listener
FD_RESERVE = 1024  # descriptors beside client connections: backends' pools, listeners, files
MIN_CONNECTIONS = 64  # the least max_connections the open file limit may lower it to


def connections_that_fit(open_files: int, configured: int, explicit: bool) -> tuple[int, bool]:
    """(max_connections to apply, whether the open file limit is too low for it).

    Each client connection may hold a backend connection too: two descriptors.
    The default (10000) is lowered to what ``open_files`` fits, so a host with
    a low limit gets a working proxy and no warning; a value set in proxyd.toml
    is kept, and said to be too high when it does not fit.
    """
    fits = max(MIN_CONNECTIONS, (open_files - FD_RESERVE) // 2)
    if configured <= fits:
        return configured, False
    if explicit:
        return configured, True
    return fits, False


class ConnectionLimit:
    """``max_connections`` of one listener: past it a new connection is closed at once.

    Each refusal is counted; the log says so at most once a minute, with how
    many were refused since.
    """

    def __init__(self, kind: str, port: int, limit: int) -> None:
        self.kind = kind
        self.port = port
        self.limit = limit
        self.refused = CONNECTIONS_REFUSED.labels(kind, str(port), "limit")
        self.warned = -WARN_EVERY
        self.unreported = 0

    def full(self, count: int) -> bool:
        """Whether a new connection, with ``count`` already open, must be refused."""
        if count < self.limit:
            return False
        self.refused.inc()
        self.unreported += 1
        now = time.monotonic()
        if now - self.warned >= WARN_EVERY:
            log.warning(
                "%s port %d is at max_connections (%d open): closed %d new connection%s at once; "
                "raise max_connections in proxyd.toml (and LimitNOFILE) if this load is expected",
                self.kind,
                self.port,
                count,
                self.unreported,
                "" if self.unreported == 1 else "s",
            )
            self.warned = now
            self.unreported = 0
        return True
