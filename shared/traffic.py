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

from shared.wire import WireError, decode
from shared.wire.traffic import DeploymentTraffic

TrafficPath = Literal["l7", "l4-kernel", "l4-proxy", "internal"]


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
        traffic = decode(text, DeploymentTraffic)
    except WireError as exc:
        raise TrafficError(f"the traffic for {deployment!r} is {exc}") from None
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
