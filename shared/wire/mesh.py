"""overlayd's encrypted mesh between nodes: its WireGuard interface and peers.

``Overlay1.EnableMesh``, ``GetMesh`` and ``RotateMeshKey`` answer a
:class:`MeshStatus`; the other nodes' keys and endpoints reach overlayd in the
traffic view's :class:`~shared.wire.traffic.PeerBlock`.
"""

from __future__ import annotations

from shared.wire import Wire


class MeshPeer(Wire, frozen=True, kw_only=True):
    """One other node as the node's WireGuard interface knows it."""

    public_key: str  # base64, as wg(8) prints it
    endpoint: str  # "host:port" as configured or last seen from handshakes; "" if none
    allowed_ips: list[str]  # the peer's block, "10.89.3.0/24"
    last_handshake: float  # Unix time; 0 = never
    rx_bytes: int
    tx_bytes: int
    keepalive: int  # persistent keepalive in seconds; 0 = off


class MeshStatus(Wire, frozen=True, kw_only=True):
    """The node's mesh: its interface, key and peers, or why it is off."""

    enabled: bool
    interface: str
    implementation: str  # "kernel" | "wireguard-go" | "" (off)
    public_key: str
    listen_port: int
    mtu: int
    address: str  # the interface's address: the node block's gateway
    peers: list[MeshPeer] = []
    reason: str = ""  # why the mesh is off, one sentence
