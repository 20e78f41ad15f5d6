"""The route table: what schedd pushed, validated, indexed for lookup, and persisted.

A push (:class:`~shared.traffic.DeploymentTraffic`) replaces one deployment's
routes. The table is rebuilt from every deployment on each push, but the
per-backend state (requests in flight, health) and the per-service counters
live in registries keyed by address and name, so they carry across pushes:
a request in flight keeps its backend, and least-connections still sees it.

L7 routes (http, https, websocket) are grouped by their endpoint's ``port``,
where proxyd listens for them: ``expose: public`` ones on every listen
address, ``expose: internal`` ones on the node network's address only. On a
port they match by host (exact, then ``*.example.com``, then any host) and
the longest path prefix, on path-segment boundaries (``/api`` matches
``/api`` and ``/api/x``, not ``/apix``). A port is plain or TLS, never both.

A public route that would be ambiguous is refused (a conflict when another
deployment has the spot). An internal one is only shadowed: it stays
reachable by service DNS, the route that holds the spot keeps it, and the
table says so in :attr:`RouteTable.shadowed`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from daemons.proxyd.metrics import RouteMetrics
from shared.statefile import StateFormatError, read_state, write_atomically
from shared.traffic import TrafficError, backend_port, endpoint_path, parse_traffic
from shared.wire import encode
from shared.wire.traffic import DeploymentTraffic, RouteInfo, ServiceStats, ServiceTraffic

DEFAULT_SESSION_TIMEOUT = 60.0
L7_PROTOCOLS = frozenset({"http", "https", "websocket"})


def _parse_saved(text: str) -> DeploymentTraffic:
    """A saved push, validated as a push is; a ValueError for a file that is not one."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise StateFormatError("it is not a saved push")
    try:
        return Routes.parse(str(raw.get("deployment", "")), text)
    except RouteError as exc:
        raise StateFormatError(str(exc)) from None


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
    port: int = 0  # where proxyd listens (the endpoint's port)
    host: str = ""  # L7 only; "" matches any host
    path: str = "/"  # L7 only
    internal: bool = False  # L7 only: served on the node network's address alone
    # L4 only
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
        """Served on a TLS listener."""
        return self.protocol == "https"

    @property
    def l7(self) -> bool:
        return self.protocol in L7_PROTOCOLS

    @property
    def where(self) -> str:
        """``demo/web endpoint http`` for sentences."""
        return f"{self.deployment}/{self.service} endpoint {self.endpoint}"

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
class PortRoutes:
    """The L7 routes of one port.

    ``public`` answers connections that arrived on any other address than
    the node network's; ``node`` (public and internal routes) the ones that
    arrived on it.
    """

    secure: bool
    public: HostIndex = field(default_factory=HostIndex)
    node: HostIndex = field(default_factory=HostIndex)
    has_public: bool = False
    has_internal: bool = False
    owners: dict[tuple[str, str], Route] = field(default_factory=dict)  # (host, path)

    def match(self, on_node: bool, host: str, path: str) -> Route | None:
        return (self.node if on_node else self.public).match(host, path)


@dataclass
class RouteTable:
    """Every route proxyd serves, built from the deployments' last pushes."""

    ports: dict[int, PortRoutes] = field(default_factory=dict)  # L7, by listening port
    l7: list[Route] = field(default_factory=list)
    l4: dict[tuple[str, int], Route] = field(default_factory=dict)  # (tcp|udp, port)
    shadowed: list[tuple[Route, str]] = field(default_factory=list)  # internal, and why not


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
        # deployment -> its push as last written to (or read from) disk: schedd sends
        # every deployment with each view, and rewriting (fsync) the unchanged ones
        # delayed the one that changed by milliseconds each.
        self._saved: dict[str, str] = {}

    # ------------------------------------------------------------ pushes

    @staticmethod
    def parse(deployment: str, traffic_json: str) -> DeploymentTraffic:
        """Validate a push; RouteError says what is wrong with it."""
        try:
            traffic = parse_traffic(deployment, traffic_json)
        except TrafficError as exc:
            raise RouteError(str(exc)) from None
        if not any(service.endpoints for service in traffic.services):
            return traffic
        # pydantic and the spec models only once a deployment has endpoints
        from pydantic import ValidationError

        from shared.spec.models import EndpointSpec

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
        if traffic.services and self.deployments.get(traffic.deployment) == traffic:
            # Unchanged (schedd's view names every deployment): the table stands.
            self.previous = (self.deployments, self.table)
            return self.table
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
        l7: list[Route] = []
        # public plain tcp ports (overlayd's DNAT takes them): port -> (deployment, where)
        kernel_tcp: dict[int, tuple[str, str]] = {}
        # The changed deployment last, so a clash is reported against the one already served.
        order = sorted(deployments, key=lambda name: (name == changed, name))
        for name in order:
            for service in deployments[name].services:
                for raw in service.endpoints:
                    if endpoint_path(raw) == "l4-kernel" and raw.get("protocol") == "tcp":
                        where = f"{name}/{service.service} endpoint {raw.get('name')}"
                        kernel_tcp.setdefault(int(raw["port"]), (name, where))
                    route = self._route(name, service.service, raw, service)
                    if route is None:
                        continue
                    if route.l7:
                        l7.append(route)
                    else:
                        self._add_l4(table, route, changed)
        # Public routes first: they are refused on a clash, internal ones only shadowed.
        for route in sorted(l7, key=lambda r: r.internal):
            self._add_l7(table, route, kernel_tcp)
        return table

    @staticmethod
    def _add_l7(table: RouteTable, route: Route, kernel_tcp: dict[int, tuple[str, str]]) -> None:
        port = route.port
        scheme = "https" if route.secure else "http"
        why = ""
        holder = ""  # the deployment that has the spot
        stream = table.l4.get(("tcp", port))
        ports = table.ports.get(port)
        if stream is not None or port in kernel_tcp:
            holder, where = (
                (stream.deployment, stream.where) if stream is not None else kernel_tcp[port]
            )
            why = (
                f"{route.where} serves {scheme} on port {port}, where {where} is a tcp "
                "endpoint; choose another port for one of them"
            )
        elif ports is not None and ports.secure != route.secure:
            other = next(iter(ports.owners.values()))
            holder = other.deployment
            why = (
                f"{route.where} serves {scheme} on port {port}, where {other.where} serves "
                f"{'https' if other.secure else 'http'}; a port is plain or TLS, so choose "
                "another port for one of them"
            )
        elif ports is not None and (route.host, route.path) in ports.owners:
            other = ports.owners[(route.host, route.path)]
            holder = other.deployment
            why = (
                f"{route.where} routes host {route.host or '*'} path {route.path} on port "
                f"{port}, which {other.where} already routes; give one of them another host "
                "or path"
            )
        if why:
            if route.internal:
                table.shadowed.append((route, why))
                return
            raise RouteError(why, conflict=holder != route.deployment)
        if ports is None:
            ports = table.ports[port] = PortRoutes(route.secure)
        ports.owners[(route.host, route.path)] = route
        ports.node.add(route)
        if route.internal:
            ports.has_internal = True
        else:
            ports.public.add(route)
            ports.has_public = True
        table.l7.append(route)

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
        l7 = raw.get("protocol") in L7_PROTOCOLS  # internal ones too: the node address serves them
        if not l7 and kind != "l4-proxy":
            return None
        from shared.spec.models import EndpointSpec

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
            port=spec.port,
            health_interval=traffic.health_interval,
        )
        previous = self._previous(route.key)
        if previous is not None:
            route.rr_next = previous.rr_next
        if l7:
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
            route.internal = kind == "internal"
            return route
        stream = spec.stream
        assert stream is not None  # l4-proxy means stream.tls or stream.proxy_protocol
        if stream.tls and spec.protocol == "udp":
            raise RouteError(
                f"{deployment}/{service} endpoint {spec.name} asks for stream.tls on udp, "
                "which proxyd does not offer (no DTLS); use tcp or drop stream.tls"
            )
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

    def route_infos(self, addresses: list[str], node_address: str) -> list[RouteInfo]:
        """What `zlayerctl routes` shows; ``node_address`` is "" while it is not known."""
        infos: list[RouteInfo] = []
        node = node_address or "(node address)"
        for route in self.table.l7:
            bound = [node] if route.internal else addresses
            infos.append(
                RouteInfo(
                    deployment=route.deployment,
                    service=route.service,
                    endpoint=route.endpoint,
                    protocol=route.protocol,
                    listen=",".join(f"{a}:{route.port}" for a in bound),
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
        path = self._dir / f"{traffic.deployment}.json"
        if not traffic.services:
            self._saved.pop(traffic.deployment, None)
            path.unlink(missing_ok=True)
            return
        text = encode(traffic)
        if self._saved.get(traffic.deployment) == text:
            return
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(path, text)
        self._saved[traffic.deployment] = text

    def load(self) -> list[str]:
        """Read every persisted push into the table; warnings for files that were skipped.

        A file that cannot be read or is not a valid push is moved aside
        (logged): schedd's next view restores what it held.
        """
        warnings: list[str] = []
        if not self._dir.is_dir():
            return warnings
        for path in sorted(self._dir.glob("*.json")):
            traffic = read_state(path, _parse_saved, "the next push from schedd restores them")
            if traffic is None:
                continue
            try:
                self.apply(traffic)
                self._saved[traffic.deployment] = encode(traffic)
            except RouteError as exc:
                warnings.append(
                    f"skipped the saved routes in {path} ({exc}); the next push restores them"
                )
        return warnings
