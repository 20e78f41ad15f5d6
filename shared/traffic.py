"""The traffic view: which replicas of a service receive traffic, and on which endpoints.

schedd owns the desired state and sees every replica's health, so it computes
this view and sends it, every deployment at once (:class:`TrafficViews`,
``SyncTraffic``), to the two daemons that move packets:

- overlayd answers service DNS from it (``web.service.local`` -> every
  in-rotation replica, ``web-2.web.service.local`` / ``2.web.service.local``
  -> one) and publishes plain tcp/udp public endpoints on the kernel path
  (nftables DNAT over the backends with ``numgen``);
- proxyd serves the L7 endpoints (http, https, websocket) and the L4
  endpoints that need userspace (``stream.tls`` or ``stream.proxy_protocol``).

A sync replaces everything the receiver held (a deployment it does not name
is removed), so the call is idempotent and a restarted receiver is made
whole by the next sync; schedd sends one on every start of a receiver
(``Scheduler1.Resync``), whenever the view changes and periodically.
Receivers persist the last view with its generation so they serve at once
after a restart, and refuse a view older than the one they hold.
``SetTraffic`` (one deployment) stays for tools and tests.

Where an endpoint is served (:func:`endpoint_path`):

- ``http`` / ``https`` / ``websocket`` endpoints are served by proxyd on the
  endpoint's own ``port`` (as upstream's proxy manager binds it), routed by
  ``host`` and ``path`` prefix among the routes that share the port:
  ``expose: public`` ones on every listen address, ``internal`` ones on the
  node network's address only. The backend port is ``target_port`` or else
  ``port``.
- ``tcp`` / ``udp`` public endpoints listen on the node at ``port`` and go to
  the backend's ``target_port`` or else ``port``.
- ``internal`` tcp and udp endpoints are reached by service DNS and replica
  addresses only.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TrafficPath = Literal["l7", "l4-kernel", "l4-proxy", "internal"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backend(_Wire):
    """One replica in rotation."""

    replica: str  # container id, <deployment>-<service>-<instance>-r<revision>
    instance: int
    revision: int
    address: str  # IPv4 on the node network


class ServiceTraffic(_Wire):
    """One service of a deployment: its endpoints and the replicas that serve them."""

    deployment: str
    service: str
    # EndpointSpec in JSON mode (shared.spec.models.EndpointSpec); kept as
    # plain dicts so the receivers validate with the spec's own model.
    endpoints: list[dict[str, Any]] = Field(default_factory=list)
    # Only replicas that may receive traffic: running, healthy (or with no
    # health check), and not draining. Ordered by (revision, instance).
    backends: list[Backend] = Field(default_factory=list)
    # From the service's health check, so receivers know how stale is too stale.
    health_interval: float = 0.0


class DeploymentTraffic(_Wire):
    """What one push carries: every service of one deployment."""

    deployment: str
    services: list[ServiceTraffic] = Field(default_factory=list)


class TrafficViews(_Wire):
    """``SyncTraffic``: every deployment's traffic, from schedd, as one complete view.

    The receiver replaces what it holds with these and removes the routes,
    records and ports of every deployment the view does not name; a view
    older than the one it holds (a lower ``generation``) is refused.
    """

    generation: int
    deployments: list[DeploymentTraffic] = Field(default_factory=list)


class ServiceStats(_Wire):
    """proxyd's counters for one service, read by schedd's autoscaler."""

    deployment: str
    service: str
    requests_total: int  # monotonic since proxyd started
    active_connections: int
    started_at: float  # when proxyd started counting (a restart resets the totals)


class DnsRecord(_Wire):
    """One name overlayd's service DNS answers, with its addresses."""

    name: str  # fully qualified, without the trailing dot: web.service.local
    addresses: list[str]
    deployment: str
    service: str


class RouteInfo(_Wire):
    """One route proxyd serves, for `zlayerctl routes` and tests."""

    deployment: str
    service: str
    endpoint: str
    protocol: str
    listen: str  # "0.0.0.0:80", "udp 0.0.0.0:5353"
    host: str = ""  # "" matches any host
    path: str = "/"
    backends: list[str] = Field(default_factory=list)  # "10.213.0.5:8080"


class TrafficError(ValueError):
    """A pushed traffic view that cannot be applied, in one sentence."""


def parse_traffic(deployment: str, text: str) -> DeploymentTraffic:
    """A push as a DeploymentTraffic, checked the way every receiver needs it.

    The document must validate, name ``deployment`` at the top and on every
    service, and give every backend an IPv4 address (the receivers put
    addresses into nft rules and DNS answers). Raises :class:`TrafficError`.
    """
    if not deployment:
        raise TrafficError("a deployment name is needed")
    try:
        traffic = DeploymentTraffic.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the document"
        raise TrafficError(
            f"the traffic for {deployment!r} is not a DeploymentTraffic ({where}: {first['msg']})"
        ) from None
    if traffic.deployment != deployment:
        raise TrafficError(
            f"the traffic names the deployment {traffic.deployment!r}, "
            f"but it was pushed for {deployment!r}"
        )
    for service in traffic.services:
        if service.deployment != deployment:
            raise TrafficError(
                f"the service {service.service!r} belongs to {service.deployment!r}, "
                f"not to {deployment!r}"
            )
        for backend in service.backends:
            try:
                IPv4Address(backend.address)
            except ValueError:
                raise TrafficError(
                    f"the backend {backend.replica!r} of {service.service!r} has the address "
                    f"{backend.address!r}, which is not an IPv4 address"
                ) from None
    return traffic


def endpoint_path(endpoint: dict[str, Any]) -> TrafficPath:
    """Which daemon serves an endpoint, by protocol, exposure and stream options."""
    if endpoint.get("expose", "internal") not in ("public", True):
        return "internal"
    protocol = endpoint.get("protocol")
    if protocol in ("http", "https", "websocket"):
        return "l7"
    stream = endpoint.get("stream") or {}
    if stream.get("tls") or stream.get("proxy_protocol"):
        return "l4-proxy"
    return "l4-kernel"


def backend_port(endpoint: dict[str, Any]) -> int:
    """The port replicas listen on for this endpoint."""
    target = endpoint.get("target_port")
    return int(target if target else endpoint["port"])
