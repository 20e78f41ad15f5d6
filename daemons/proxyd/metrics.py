"""proxyd's Prometheus metrics, per route (deployment, service, endpoint).

Label children are looked up once per route and kept, so a request pays a
few increments and no label lookups.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_ROUTE = ["deployment", "service", "endpoint"]

REQUESTS = Counter(
    "zlayer_proxy_requests", "Requests answered, by route and status class.", [*_ROUTE, "code"]
)
LATENCY = Histogram(
    "zlayer_proxy_request_duration_seconds",
    "From a request's headers to the end of its response, by route.",
    _ROUTE,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ACTIVE = Gauge(
    "zlayer_proxy_active_connections",
    "Requests, WebSocket and stream connections in flight, by route.",
    _ROUTE,
)
BYTES_IN = Counter("zlayer_proxy_received_bytes", "Bytes received from clients, by route.", _ROUTE)
BYTES_OUT = Counter("zlayer_proxy_sent_bytes", "Bytes sent to clients, by route.", _ROUTE)
UNROUTED = Counter(
    "zlayer_proxy_unrouted_requests",
    "Requests no route matched (answered 404), by listener.",
    ["listener"],
)
CONNECTIONS_REFUSED = Counter(
    "zlayer_proxy_connections_refused",
    "Client connections closed at once because their listener was at max_connections, "
    "by listener kind, port and reason.",
    ["listener", "port", "reason"],
)
REQUESTS_REFUSED = Counter(
    "zlayer_proxy_requests_refused",
    "Requests answered with an error before routing (400, 408, 414, 431), by listener and reason.",
    ["listener", "reason"],
)
ACCESS_LOG_DROPPED = Counter(
    "zlayer_proxy_access_log_dropped",
    "Access log lines dropped because the log was written slower than requests came.",
)
UDP_SESSIONS_EVICTED = Counter(
    "zlayer_proxy_udp_sessions_evicted",
    "udp sessions ended early to make room for a new client (udp_max_sessions), by route.",
    _ROUTE,
)
BACKEND_FAILURES = Counter(
    "zlayer_proxy_backend_failures",
    "Backend connections that failed or timed out, by route and kind.",
    [*_ROUTE, "kind"],
)


class RouteMetrics:
    """The label children of one route."""

    __slots__ = ("_labels", "_requests", "active", "bytes_in", "bytes_out", "latency")

    def __init__(self, deployment: str, service: str, endpoint: str) -> None:
        self._labels = (deployment, service, endpoint)
        self._requests: dict[int, Counter] = {}
        self.latency = LATENCY.labels(*self._labels)
        self.active = ACTIVE.labels(*self._labels)
        self.bytes_in = BYTES_IN.labels(*self._labels)
        self.bytes_out = BYTES_OUT.labels(*self._labels)

    def request_done(self, status: int, seconds: float, received: int, sent: int) -> None:
        status_class = status // 100
        counter = self._requests.get(status_class)
        if counter is None:
            counter = REQUESTS.labels(*self._labels, f"{status_class}xx")
            self._requests[status_class] = counter
        counter.inc()
        self.latency.observe(seconds)
        if received:
            self.bytes_in.inc(received)
        if sent:
            self.bytes_out.inc(sent)

    def backend_failure(self, kind: str) -> None:
        BACKEND_FAILURES.labels(*self._labels, kind).inc()
