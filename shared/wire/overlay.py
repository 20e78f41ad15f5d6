"""overlayd's values: a replica's network attachment, the node network."""

from __future__ import annotations

from shared.wire import Wire


class Attachment(Wire, frozen=True, kw_only=True):
    """A replica's network: its namespace, address and resolvers."""

    container_id: str
    netns: str  # path of the network namespace, for the OCI config
    interface: str  # name inside the namespace
    address: str  # the replica's IPv4 address
    prefix_len: int
    gateway: str
    dns: list[str]  # nameservers for the replica's resolv.conf
    search: list[str] = []
    host_veth: str
    bridge: str


class NetworkInfo(Wire, frozen=True):
    bridge: str
    subnet: str  # "10.89.0.0/16"
    gateway: str
    allocations: int
