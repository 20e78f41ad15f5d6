"""A WireGuard device as the mesh configures it, whatever runs it (kernel or userspace).

:class:`Device` is what both implementations offer; :func:`plan` says which
peers to add, change and remove so that a device holds exactly the wanted
ones, leaving an unchanged peer (its session, its roamed endpoint) alone;
:func:`renewal` makes it drop its sessions and handshake afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class MeshError(Exception):
    """The WireGuard device cannot be made, configured or read, in one sentence."""


@dataclass(frozen=True)
class PeerConfig:
    """One peer as it should be: key (base64), endpoint ("ip:port" or ""), routes, keepalive."""

    public_key: str
    endpoint: str = ""
    allowed_ips: tuple[str, ...] = ()
    keepalive: int = 0


@dataclass(frozen=True)
class PeerState:
    """One peer as the device reports it."""

    public_key: str
    endpoint: str = ""
    allowed_ips: tuple[str, ...] = ()
    keepalive: int = 0
    last_handshake: float = 0.0  # Unix time, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class DeviceState:
    """What ``get`` answers: the device's key (base64, "" if none), port and peers."""

    private_key: str = ""
    listen_port: int = 0
    peers: tuple[PeerState, ...] = field(default=())

    def peer(self, public_key: str) -> PeerState | None:
        return next((p for p in self.peers if p.public_key == public_key), None)


@dataclass(frozen=True)
class Changes:
    """What to send a device: its key and port (None = leave), peers to write, to remove."""

    private_key: str | None = None
    listen_port: int | None = None
    upsert: tuple[PeerConfig, ...] = ()
    # Peers written with their endpoint (new ones, or whose configured endpoint changed).
    with_endpoint: frozenset[str] = frozenset()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.private_key is not None
            or self.listen_port is not None
            or self.upsert
            or self.remove
        )


def plan(
    current: DeviceState,
    wanted: list[PeerConfig],
    configured: dict[str, str] | None = None,
) -> Changes:
    """The peer changes that make ``current`` hold exactly ``wanted``.

    ``configured`` maps a key to the endpoint last set for it: an endpoint the
    device learned from handshakes (roaming, NAT) is kept unless the wanted
    endpoint itself changed. A new peer gets its endpoint if it has one.
    Unchanged peers are not named, so their sessions are not touched.
    """
    configured = configured or {}
    wanted_by_key = {p.public_key: p for p in wanted}
    remove = tuple(sorted(p.public_key for p in current.peers if p.public_key not in wanted_by_key))
    upsert: list[PeerConfig] = []
    endpoints: set[str] = set()
    for peer in wanted_by_key.values():
        have = current.peer(peer.public_key)
        endpoint_changed = bool(peer.endpoint) and (
            have is None
            or not have.endpoint
            or configured.get(peer.public_key, have.endpoint) != peer.endpoint
        )
        if (
            have is None
            or sorted(have.allowed_ips) != sorted(peer.allowed_ips)
            or have.keepalive != peer.keepalive
            or endpoint_changed
        ):
            upsert.append(peer)
            if endpoint_changed:
                endpoints.add(peer.public_key)
    return Changes(upsert=tuple(upsert), with_endpoint=frozenset(endpoints), remove=remove)


def renewal(current: DeviceState) -> tuple[Changes, Changes]:
    """The two steps that make ``current`` drop its session with each peer it has an
    endpoint for and handshake afresh: remove them, then add them back as they are
    (endpoint, allowed IPs, keepalive).

    A device that outlived its daemon (``wireguard-go``, the kernel's link) keeps its
    sessions, while the other side may have dropped its peer meanwhile (the node's
    record lapsed) and added it back without a session or, for a node behind NAT,
    an endpoint. The kept session then looks current to this side, which sends its
    keepalives on it (never a handshake: keepalives are not data, so no reply is
    awaited) and the other side drops them, until the session ages out after two
    to three minutes. A peer added back with a keepalive sends one at once, which
    starts a handshake, retried every 5 s until it is answered; one without a
    keepalive handshakes on its next packet."""
    again = tuple(
        PeerConfig(
            public_key=peer.public_key,
            endpoint=peer.endpoint,
            allowed_ips=peer.allowed_ips,
            keepalive=peer.keepalive,
        )
        for peer in current.peers
        if peer.endpoint
    )
    return (
        Changes(remove=tuple(peer.public_key for peer in again)),
        Changes(upsert=again, with_endpoint=frozenset(peer.public_key for peer in again)),
    )


class Device(Protocol):
    """One WireGuard interface, however it runs."""

    name: str
    implementation: str  # "kernel" | "wireguard-go"

    def start(self) -> str:
        """Make the interface, or find it made; what was done, for the log."""
        ...

    def stop(self) -> bool:
        """Remove the interface; False if there was none."""
        ...

    def running(self) -> bool:
        """True if the interface is there and answers."""
        ...

    def get(self) -> DeviceState:
        """What the device holds now."""
        ...

    def apply(self, changes: Changes) -> None:
        """Send the changes in one operation; MeshError if refused."""
        ...
