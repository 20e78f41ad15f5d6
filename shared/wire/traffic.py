"""The traffic view schedd sends overlayd and proxyd, and what they report back.

What each field means for routing is told in :mod:`shared.traffic`, which
also holds the rules both receivers apply to a view.
"""

from __future__ import annotations

from typing import Any

from shared.wire import Wire


class Backend(Wire, frozen=True):
    """One replica in rotation."""

    replica: str  # container id, <deployment>-<service>-<instance>-r<revision>
    instance: int
    revision: int
    address: str  # IPv4 on the node network


class ServiceTraffic(Wire, frozen=True):
    """One service of a deployment: its endpoints and the replicas that serve them."""

    deployment: str
    service: str
    # EndpointSpec in JSON mode (shared.spec.models.EndpointSpec); kept as
    # plain dicts so the receivers validate with the spec's own model.
    endpoints: list[dict[str, Any]] = []
    # Only replicas that may receive traffic: running, healthy (or with no
    # health check), and not draining. Ordered by (revision, instance).
    backends: list[Backend] = []
    # From the service's health check, so receivers know how stale is too stale.
    health_interval: float = 0.0


class DeploymentTraffic(Wire, frozen=True):
    """What one push carries: every service of one deployment."""

    deployment: str
    services: list[ServiceTraffic] = []


class PeerBlock(Wire, frozen=True):
    """Another node of the cluster: its replicas' block and the address it is reached at."""

    node: str
    subnet: str  # "10.89.3.0/24"
    address: str  # the node's advertise address
    # The mesh: a non-empty key means the block is reached through overlayd's
    # WireGuard interface (peer with this public key), not via ``address``.
    wireguard_key: str = ""  # the node's WireGuard public key (base64)
    endpoint: str = ""  # "host:port" of its WireGuard listener; "" = learn from handshakes
    keepalive: int = 0  # persistent keepalive in seconds (behind NAT); 0 = off


class TrafficViews(Wire, frozen=True):
    """``SyncTraffic``: every deployment's traffic, from schedd, as one complete view.

    The receiver replaces what it holds with these and removes the routes,
    records and ports of every deployment the view does not name; a view
    older than the one it holds (a lower ``generation``) is refused.
    """

    generation: int
    deployments: list[DeploymentTraffic] = []
    # In a cluster, the other nodes' blocks: overlayd routes each via its node
    # (proxyd ignores it). Empty on a lone node.
    peers: list[PeerBlock] = []


class ServiceStats(Wire, frozen=True):
    """proxyd's counters for one service, read by schedd's autoscaler."""

    deployment: str
    service: str
    requests_total: int  # monotonic since proxyd started
    active_connections: int
    started_at: float  # when proxyd started counting (a restart resets the totals)


class DnsRecord(Wire, frozen=True):
    """One name overlayd's service DNS answers, with its addresses."""

    name: str  # fully qualified, without the trailing dot: web.service.local
    addresses: list[str]
    deployment: str
    service: str


class RouteInfo(Wire, frozen=True):
    """One route proxyd serves, for `zlayerctl routes` and tests."""

    deployment: str
    service: str
    endpoint: str
    protocol: str
    listen: str  # "0.0.0.0:80", "udp 0.0.0.0:5353"
    host: str = ""  # "" matches any host
    path: str = "/"
    backends: list[str] = []  # "10.213.0.5:8080"
