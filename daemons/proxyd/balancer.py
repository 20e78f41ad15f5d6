"""Choosing a backend for a request or a stream connection.

Only backends in rotation are candidates: schedd pushes only running,
healthy replicas, and proxyd's own L4 health checks clear ``healthy`` on
the ones that fail. ``exclude`` holds a backend that just failed, so the
one retry goes elsewhere.
"""

from __future__ import annotations

from daemons.proxyd.routes import BackendState, Route
from daemons.proxyd.settings import Balancing


def pick(
    route: Route, balancing: Balancing, exclude: BackendState | None = None
) -> BackendState | None:
    """The next backend of ``route``, or None when none is in rotation."""
    backends = route.backends
    count = len(backends)
    if count == 0:
        return None
    start = route.rr_next
    if balancing == "least_connections":
        # Fewest in flight wins; ties go round-robin so idle backends share the load.
        best: BackendState | None = None
        best_index = 0
        for step in range(count):
            index = (start + step) % count
            backend = backends[index]
            if backend is exclude or not backend.healthy:
                continue
            if best is None or backend.active < best.active:
                best = backend
                best_index = index
        if best is not None:
            route.rr_next = (best_index + 1) % count
        return best
    for step in range(count):
        index = (start + step) % count
        backend = backends[index]
        if backend is exclude or not backend.healthy:
            continue
        route.rr_next = (index + 1) % count
        return backend
    return None
