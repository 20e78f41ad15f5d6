"""The route table: what schedd pushed, validated, indexed for lookup, and persisted.

A push (:class:`~shared.traffic.DeploymentTraffic`) replaces one deployment's
routes. The table is rebuilt from every deployment on each push, but the
per-backend state (requests in flight, health) and the per-service counters
live in registries keyed by address and name, so they carry across pushes:
a request in flight keeps its backend, and least-connections still sees it.

L7 routes match by host (exact, then ``*.example.com``, then any host) and
the longest path prefix, on path-segment boundaries (``/api`` matches
``/api`` and ``/api/x``, not ``/apix``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemons.proxyd.metrics import RouteMetrics
from shared.spec.models import EndpointSpec
from shared.traffic import (
    DeploymentTraffic,
    RouteInfo,
    ServiceStats,
    ServiceTraffic,
    TrafficError,
    backend_port,
    endpoint_path,
    parse_traffic,
)

DEFAULT_SESSION_TIMEOUT = 60.0


class RouteError(Exception):
    """A push that cannot be served, in one sentence; ``conflict``: another deployment has it."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


class BackendState:
    """One backend address and port; shared by every route that uses it."""

    __slots__ = ("active", "address", "healthy", "key", "port")

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.key = f"{address}:{port}"
        self.active = 0  # requests and stream connections in flight
        self.healthy = True  # proxyd's own L4 health checks; L7 trusts schedd's view


@dataclass
class ServiceCounters:
    """What ServiceStats reports for one (deployment, service)."""

    requests_total: int = 0
    active: int = 0


@dataclass(eq=False)
class Route:
    """One endpoint of one service: where it listens or matches, and its backends."""

    deployment: str
    service: str
    endpoint: str
    protocol: str
    backends: list[BackendState]
    counters: ServiceCounters
    metrics: RouteMetrics
    host: str = ""  # L7 only; "" matches any host
    path: str = "/"  # L7 only
    # L4 only
    port: int = 0
    tls: bool = False
    proxy_protocol: bool = False
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    health_check: dict[str, Any] | None = None
    health_interval: float = 0.0
    rr_next: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.deployment, self.service, self.endpoint)

    @property
    def secure(self) -> bool:
        """Served on the TLS listener."""
        return self.protocol == "https"

    def path_matches(self, path: str) -> bool:
        prefix = self.path
        if prefix == "/" or path == prefix:
            return True
        if not path.startswith(prefix):
            return False
        return prefix.endswith("/") or path[len(prefix)] in "/?"


@dataclass
class HostIndex:
    """L7 routes of one listener, indexed by host; each list longest path first."""

    exact: dict[str, list[Route]] = field(default_factory=dict)
    wildcard: dict[str, list[Route]] = field(
        default_factory=dict
    )  # "example.com" for *.example.com
    any_host: list[Route] = field(default_factory=list)

    def add(self, route: Route) -> None:
        if not route.host:
            bucket = self.any_host
        elif route.host.startswith("*."):
            bucket = self.wildcard.setdefault(route.host[2:], [])
        else:
            bucket = self.exact.setdefault(route.host, [])
        bucket.append(route)
        bucket.sort(key=lambda r: len(r.path), reverse=True)

    def match(self, host: str, path: str) -> Route | None:
        candidates = self.exact.get(host)
        if candidates:
            for route in candidates:
                if route.path_matches(path):
                    return route
        if self.wildcard:
            dot = host.find(".")
            while dot != -1:
                candidates = self.wildcard.get(host[dot + 1 :])
                if candidates:
                    for route in candidates:
                        if route.path_matches(path):
                            return route
                dot = host.find(".", dot + 1)
        for route in self.any_host:
            if route.path_matches(path):
                return route
        return None


def normalize_host(value: str) -> str:
    """``Example.COM:8080`` -> ``example.com``; IPv6 literals keep their brackets off."""
    host = value.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    colon = host.rfind(":")
    if colon != -1:
        host = host[:colon]
    return host.rstrip(".")


@dataclass
class RouteTable:
    """Every route proxyd serves, built from the deployments' last pushes."""

    plain: HostIndex = field(default_factory=HostIndex)
    secure: HostIndex = field(default_factory=HostIndex)
    l7: list[Route] = field(default_factory=list)
    l4: dict[tuple[str, int], Route] = field(default_factory=dict)  # (tcp|udp, port)


class Routes:
    """The pushed deployments, the table built from them, and the registries that outlive it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.deployments: dict[str, DeploymentTraffic] = {}
        self.table = RouteTable()
        self.previous: tuple[dict[str, DeploymentTraffic], RouteTable] = ({}, self.table)
        self.backends: dict[str, BackendState] = {}
        self.counters: dict[tuple[str, str], ServiceCounters] = {}
        self.metrics: dict[tuple[str, str, str], RouteMetrics] = {}
        self.started_at = time.time()

    # ------------------------------------------------------------ pushes

    @staticmethod
    def parse(deployment: str, traffic_json: str) -> DeploymentTraffic:
        """Validate a push; RouteError says what is wrong with it."""
        try:
            traffic = parse_traffic(deployment, traffic_json)
        except TrafficError as exc:
            raise RouteError(str(exc)) from None
        for service in traffic.services:
            for index, endpoint in enumerate(service.endpoints):
                try:
                    EndpointSpec.model_validate(endpoint)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    raise RouteError(
                        f"endpoint {index} of {deployment}/{service.service} is not valid: "
                        f"{where}: {first['msg']}"
                    ) from None
        return traffic

    def apply(self, traffic: DeploymentTraffic) -> RouteTable:
        """Replace one deployment (remove it when it has no services); the new table.

        Raises RouteError, leaving everything as it was, when the result would
        be ambiguous or clash with another deployment.
        """
        deployments = dict(self.deployments)
        if traffic.services:
            deployments[traffic.deployment] = traffic
        else:
            deployments.pop(traffic.deployment, None)
        table = self._build(deployments, changed=traffic.deployment)
        self.previous = (self.deployments, self.table)
        self.deployments = deployments
        self.table = table
        return table

    def undo(self) -> None:
        """Go back to before the last :meth:`apply` (its listeners could not be opened)."""
        self.deployments, self.table = self.previous

    def _build(self, deployments: dict[str, DeploymentTraffic], changed: str) -> RouteTable:
        table = RouteTable()
        l7_owner: dict[tuple[bool, str, str], Route] = {}
        # The changed deployment last, so a clash is reported against the one already served.
        order = sorted(deployments, key=lambda name: (name == changed, name))
        for name in order:
            for service in deployments[name].services:
                for raw in service.endpoints:
                    route = self._route(name, service.service, raw, service)
                    if route is None:
                        continue
                    if route.port:
                        self._add_l4(table, route, changed)
                        continue
                    spot = (route.secure, route.host, route.path)
                    other = l7_owner.get(spot)
                    if other is not None:
                        raise RouteError(
                            f"{name}/{route.service} endpoint {route.endpoint} routes "
                            f"host {route.host or '*'} path {route.path}, which "
                            f"{other.deployment}/{other.service} endpoint {other.endpoint} "
                            "already routes; give one of them another host or path",
                            conflict=other.deployment != name,
                        )
                    l7_owner[spot] = route
                    table.l7.append(route)
                    (table.secure if route.secure else table.plain).add(route)
        return table

    @staticmethod
    def _add_l4(table: RouteTable, route: Route, changed: str) -> None:
        spot = (route.protocol, route.port)
        other = table.l4.get(spot)
        if other is not None:
            raise RouteError(
                f"{route.deployment}/{route.service} endpoint {route.endpoint} listens on "
                f"{route.protocol} port {route.port}, which {other.deployment}/{other.service} "
                f"endpoint {other.endpoint} already holds; choose another port",
                conflict=other.deployment != route.deployment,
            )
        table.l4[spot] = route

    def _route(
        self, deployment: str, service: str, raw: dict[str, Any], traffic: ServiceTraffic
    ) -> Route | None:
        kind = endpoint_path(raw)
        if kind not in ("l7", "l4-proxy"):
            return None
        spec = EndpointSpec.model_validate(raw)
        port = backend_port(raw)
        backends = [self._backend(b.address, port) for b in traffic.backends]
        counters = self.counters.setdefault((deployment, service), ServiceCounters())
        metrics_key = (deployment, service, spec.name)
        metrics = self.metrics.get(metrics_key)
        if metrics is None:
            metrics = self.metrics[metrics_key] = RouteMetrics(*metrics_key)
        route = Route(
            deployment=deployment,
            service=service,
            endpoint=spec.name,
            protocol=spec.protocol,
            backends=backends,
            counters=counters,
            metrics=metrics,
            health_interval=traffic.health_interval,
        )
        previous = self._previous(route.key)
        if previous is not None:
            route.rr_next = previous.rr_next
        if kind == "l7":
            host = normalize_host(spec.host or "")
            if host == "*":
                host = ""
            if "*" in host and not (host.startswith("*.") and "*" not in host[2:]):
                raise RouteError(
                    f"{deployment}/{service} endpoint {spec.name} has host {spec.host!r}; "
                    "a wildcard host is written *.example.com"
                )
            path = spec.path or "/"
            if not path.startswith("/"):
                raise RouteError(
                    f"{deployment}/{service} endpoint {spec.name} has path {path!r}; "
                    "a path starts with /"
                )
            route.host = host
            route.path = path
            return route
        stream = spec.stream
        assert stream is not None  # l4-proxy means stream.tls or stream.proxy_protocol
        if stream.tls and spec.protocol == "udp":
            raise RouteError(
                f"{deployment}/{service} endpoint {spec.name} asks for stream.tls on udp, "
                "which proxyd does not offer (no DTLS); use tcp or drop stream.tls"
            )
        route.port = spec.port
        route.tls = stream.tls
        route.proxy_protocol = stream.proxy_protocol
        if isinstance(stream.session_timeout, timedelta):
            route.session_timeout = stream.session_timeout.total_seconds()
        if stream.health_check is not None:
            route.health_check = stream.health_check.model_dump(mode="json")
        return route

    def _previous(self, key: tuple[str, str, str]) -> Route | None:
        for route in (*self.table.l7, *self.table.l4.values()):
            if route.key == key:
                return route
        return None

    def _backend(self, address: str, port: int) -> BackendState:
        key = f"{address}:{port}"
        state = self.backends.get(key)
        if state is None:
            state = self.backends[key] = BackendState(address, port)
        return state

    def in_use(self) -> set[str]:
        """Keys of every backend some route still has."""
        table = self.table
        return {b.key for r in (*table.l7, *table.l4.values()) for b in r.backends}

    def forget_unused(self) -> list[str]:
        """Drop registry entries of backends no route has and nothing uses; their keys."""
        used = self.in_use()
        gone = [k for k, b in self.backends.items() if k not in used and b.active == 0]
        for key in gone:
            del self.backends[key]
        return gone

    # ------------------------------------------------------------ reports

    def route_infos(
        self, http_listen: str, https_listen: str, addresses: list[str]
    ) -> list[RouteInfo]:
        infos: list[RouteInfo] = []
        for route in self.table.l7:
            infos.append(
                RouteInfo(
                    deployment=route.deployment,
                    service=route.service,
                    endpoint=route.endpoint,
                    protocol=route.protocol,
                    listen=https_listen if route.secure else http_listen,
                    host=route.host,
                    path=route.path,
                    backends=[b.key for b in route.backends],
                )
            )
        for (protocol, port), route in sorted(self.table.l4.items()):
            where = ",".join(f"{a}:{port}" for a in addresses)
            infos.append(
                RouteInfo(
                    deployment=route.deployment,
                    service=route.service,
                    endpoint=route.endpoint,
                    protocol=route.protocol,
                    listen=where if protocol == "tcp" else f"udp {where}",
                    backends=[b.key for b in route.backends if b.healthy],
                )
            )
        return infos

    def stats(self) -> list[ServiceStats]:
        return [
            ServiceStats(
                deployment=deployment,
                service=service,
                requests_total=counters.requests_total,
                active_connections=counters.active,
                started_at=self.started_at,
            )
            for (deployment, service), counters in sorted(self.counters.items())
        ]

    # ------------------------------------------------------------ persistence

    @property
    def _dir(self) -> Path:
        return self.state_dir / "traffic"

    def save(self, traffic: DeploymentTraffic) -> None:
        """Write (or remove) one deployment's last push; blocking, run it in a thread."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._dir / f"{traffic.deployment}.json"
        if not traffic.services:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(traffic.model_dump_json())
        os.replace(tmp, path)

    def load(self) -> list[str]:
        """Read every persisted push into the table; warnings for files that were skipped."""
        warnings: list[str] = []
        if not self._dir.is_dir():
            return warnings
        for path in sorted(self._dir.glob("*.json")):
            try:
                raw = json.loads(path.read_text())
                traffic = self.parse(str(raw.get("deployment", "")), json.dumps(raw))
                self.apply(traffic)
            except (OSError, ValueError, AttributeError, RouteError) as exc:
                warnings.append(
                    f"skipped the saved routes in {path} ({exc}); the next push restores them"
                )
        return warnings
