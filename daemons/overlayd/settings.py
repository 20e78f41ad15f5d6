"""zlayer-overlayd's settings: ``/etc/zlayer/overlayd.toml`` and ``ZLAYER_OVERLAYD_*``.

Keys (besides the ones every daemon has):

``bridge``          the node bridge, default ``zlayer0``
``subnet``          the replicas' IPv4 range, default ``10.213.0.0/16``; the
                    first address is the bridge's (the replicas' gateway).
                    Podman and buildah default to 10.88.0.0/16, so ZLayer
                    stays clear of it. In a cluster the node's block of the
                    cluster's range (``block`` in cluster.toml, handed out
                    at node init and join) is the subnet instead.
``nameservers``     resolvers the service DNS forwards names outside
                    ``service.local`` to (``address`` or ``address:port``);
                    unset means the host's, from /etc/resolv.conf
``search_domains``  search list for replicas after ``service.local``; unset
                    means the host's
``dns_port``        where the service DNS listens on the gateway address
                    (UDP and TCP), default 53; replicas' resolv.conf names
                    the gateway, so only 53 serves them
``dns_max_in_flight``  forwarded service DNS queries (names outside
                    ``service.local``) waiting for an upstream at once,
                    default 256; past it a query is dropped unanswered and
                    counted in ``zlayer_overlay_dns_dropped_total{reason="busy"}``
``dns_max_tcp_connections``  service DNS TCP connections at once, default
                    64; past it a new one is closed and counted
                    (``reason="tcp_connections"``)
``stream_probe_interval``  seconds between probes of kernel-path backends
                    with a ``stream.health_check``, default 5
``nft_table``       the nftables table (family ``ip``) holding the NAT and
                    forward rules; unset means ``zlayer`` for the default
                    bridge and ``zlayer_<bridge>`` for any other, so two
                    overlayd instances (tests) never share a table
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Address, ip_address
from typing import TYPE_CHECKING, Annotated, Self

from msgspec import Meta

from daemons.overlayd.dns import MAX_IN_FLIGHT, MAX_TCP_CONNECTIONS, parse_upstream
from shared.cluster import config as cluster_config
from shared.config import ConfigError, DaemonSettings, invalid

if TYPE_CHECKING:
    from shared.paths import Paths

DEFAULT_BRIDGE = "zlayer0"
DEFAULT_SUBNET = IPv4Network("10.213.0.0/16")
DEFAULT_TABLE = "zlayer"

# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no slash or space.
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_NFT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class OverlaySettings(DaemonSettings, kw_only=True):
    # the node bridge's interface name
    bridge: str = DEFAULT_BRIDGE
    # the replicas' IPv4 range
    subnet: IPv4Network = DEFAULT_SUBNET
    # resolvers other names are forwarded to; unset means the host's
    nameservers: list[str] | None = None
    # replicas' DNS search list; unset means the host's
    search_domains: list[str] | None = None
    # nftables table name; unset derives it from bridge
    nft_table: str = ""
    # the service DNS port on the gateway
    dns_port: Annotated[int, Meta(ge=1, le=65535)] = 53
    # forwarded DNS queries waiting at once; more are dropped
    dns_max_in_flight: Annotated[int, Meta(ge=1, le=65536)] = MAX_IN_FLIGHT
    # DNS TCP connections at once; more are closed
    dns_max_tcp_connections: Annotated[int, Meta(ge=1, le=65536)] = MAX_TCP_CONNECTIONS
    # seconds between stream health probes
    stream_probe_interval: Annotated[float, Meta(gt=0, le=3600)] = 5.0

    def __post_init__(self) -> None:
        if not _IFNAME.match(self.bridge):
            raise invalid(
                "bridge",
                "an interface name is 1 to 15 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit",
            )
        if self.subnet.prefixlen > 30:
            raise invalid(
                "subnet", "the subnet needs room for a gateway and a replica: /30 or larger"
            )
        if self.nameservers is not None:
            try:
                self.nameservers = [str(parse_upstream(item)) for item in self.nameservers]
            except ValueError as exc:
                raise invalid("nameservers", str(exc)) from None
        if self.nft_table and not _NFT_NAME.match(self.nft_table):
            raise invalid(
                "nft_table", "a table name is letters, digits and '_', starting with a letter"
            )

    @classmethod
    def load(cls, daemon: str, paths: Paths) -> Self:
        settings = super().load(daemon, paths)
        try:
            block = cluster_config.block_of(paths)
        except cluster_config.ClusterConfigError as exc:
            raise ConfigError(str(exc)) from None
        if block is not None:
            try:
                settings.subnet = IPv4Network(block)  # the cluster's block for this node
            except ValueError:
                raise ConfigError(
                    f"{cluster_config.path_of(paths)}: `block`: {block!r} is not an IPv4 "
                    "subnet; fix it, or join the node to its cluster again"
                ) from None
        return settings

    @property
    def table(self) -> str:
        """The nftables table overlayd owns (family ``ip``)."""
        if self.nft_table:
            return self.nft_table
        if self.bridge == DEFAULT_BRIDGE:
            return DEFAULT_TABLE
        return DEFAULT_TABLE + "_" + re.sub(r"[^A-Za-z0-9_]", "_", self.bridge)


def host_resolvers(text: str) -> tuple[list[str], list[str], list[str]]:
    """(usable nameservers, skipped loopback nameservers, search domains) of a resolv.conf.

    A replica has its own loopback, so a resolver on the host's 127.0.0.0/8
    (systemd-resolved, dnsmasq) cannot be reached from inside it.
    """
    usable: list[str] = []
    skipped: list[str] = []
    search: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        if words[0] == "nameserver":
            try:
                address = ip_address(words[1].split("%", 1)[0])
            except ValueError:
                continue
            if address.is_loopback or (isinstance(address, IPv6Address) and address.is_link_local):
                skipped.append(str(address))
            else:
                usable.append(str(address))
        elif words[0] in ("search", "domain"):
            # The last search or domain line wins, as in resolv.conf(5).
            search = words[1:]
    return usable, skipped, search
