"""The node's end of the cluster's encrypted mesh: one WireGuard interface and its peers.

Once ``EnableMesh`` turned it on, the node has a WireGuard interface named
after its bridge (:func:`interface_name`, unique per machine), with the node's
private key (``mesh.key`` in overlayd's state directory, 0600), a listen
port, the node block's gateway as its address (/32) and an MTU 80 bytes below
the underlay's on the way to the peers (WireGuard's IPv4 overhead is 60, IPv6
80), so that nothing fragments. Each other node whose ``PeerBlock`` carries a
WireGuard key becomes a peer (allowed-ips = its block, its endpoint and
keepalive) and its block is routed through the interface
(:data:`MESH_ROUTE_PROTO`); changed peers are updated, unchanged ones left
alone (their session, and an endpoint learned from handshakes behind NAT).
A device found running when overlayd starts renews its sessions with every
peer it has an endpoint for (a handshake each, at once): the other nodes may
have dropped this node's peer while its daemons were down.

The kernel's WireGuard is used where the kernel has it, ``wireguard-go``
otherwise (:mod:`shared.mesh`). ``wireguard-go`` outlives an overlayd restart,
as the bridge does, so replicas keep talking across it; a restarted overlayd
finds it by its PID file, or starts a new one with the same key and the peers
kept in ``mesh.json``. ``--remove-network`` stops it and forgets the mesh.

:class:`Mesh` is blocking, like :class:`~daemons.overlayd.network.NodeNetwork`,
which calls it from its worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

from shared.mesh import kernel, keys, userspace
from shared.mesh.device import Changes, Device, MeshError, PeerConfig, plan, renewal
from shared.statefile import read_state, write_atomically
from shared.wire import Wire, decode, encode
from shared.wire.mesh import MeshPeer, MeshStatus
from shared.wire.traffic import PeerBlock

MESH_FILE = "mesh.json"
KEY_FILE = "mesh.key"
PID_FILE = "wireguard-go.pid"
LOG_FILE = "wireguard-go.log"
# The protocol number of overlayd's routes through the mesh (90 marks the plain ones).
MESH_ROUTE_PROTO = 91
OVERHEAD = 80  # WireGuard over IPv6: 40 IP + 8 UDP + 32 WireGuard; IPv4 needs 60
DEFAULT_UNDERLAY_MTU = 1500
MIN_MTU = 1280

log = logging.getLogger("zlayer.overlayd")


class MeshState(Wire, frozen=True, kw_only=True):
    """``mesh.json``: the mesh is on, on this port, with these peers."""

    listen_port: int
    peers: list[PeerBlock] = []


def interface_name(bridge: str) -> str:
    """The mesh interface of a bridge: ``<bridge>-wg``, or a hash when that is too long.

    Bridge names are unique per machine (overlayd refuses a name in use), so
    these are too, which wireguard-go needs: its sockets share one directory.
    """
    name = f"{bridge}-wg"
    if len(name) <= 15:
        return name
    return "zlwg" + hashlib.sha256(bridge.encode()).hexdigest()[:11]


def _resolve(endpoint: str) -> str:
    """``host:port`` with the host as an address (the device takes no names); "" if none."""
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        return ""
    try:
        address = ip_address(host)
    except ValueError:
        try:
            found = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError):
            log.warning("cannot resolve the mesh endpoint %s; waiting for its handshake", endpoint)
            return ""
        address = ip_address(found[0][4][0])
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def new_device(
    interface: str, pid_path: Path, log_path: Path, kernel_module: Path = kernel.MODULE
) -> Device:
    """The kernel's WireGuard where the kernel has it (``kernel_module`` is there: faster,
    no process to keep), ``wireguard-go`` otherwise (its PID and log files given)."""
    if kernel.available(kernel_module):
        return kernel.KernelDevice(interface)
    return userspace.UserspaceDevice(interface, pid_path, log_path)


class Mesh:
    """The node's WireGuard interface, its key, peers and routes."""

    def __init__(
        self, bridge: str, gateway: IPv4Address, subnet: IPv4Network, state_dir: Path
    ) -> None:
        self.interface = interface_name(bridge)
        self.gateway = gateway
        self.subnet = subnet
        self.state_path = state_dir / MESH_FILE
        self.key_path = state_dir / KEY_FILE
        self.pid_path = state_dir / PID_FILE
        self.log_path = state_dir / LOG_FILE
        self.state: MeshState | None = None
        self.device: Device | None = None
        self.mtu = 0
        self.reason = "the mesh is off: the node is not in a cluster with the mesh on"
        # The endpoint last given for each peer key: one learned from handshakes is
        # kept unless the configured one changes.
        self.configured: dict[str, str] = {}
        self._widen_said = ""  # the last failure to widen wireguard-go's buffers, logged

    # ------------------------------------------------------------ state

    def load(self) -> None:
        self.state = read_state(
            self.state_path,
            lambda text: decode(text, MeshState),
            "the mesh stays off until EnableMesh",
            log,
        )

    @property
    def enabled(self) -> bool:
        return self.state is not None

    @property
    def running(self) -> bool:
        return self.device is not None

    def _save(self, state: MeshState) -> None:
        write_atomically(self.state_path, encode(state) + "\n", 0o600)
        self.state = state

    def _private_key(self) -> str:
        """The node's private key, made and kept (0600) the first time."""
        try:
            return keys.check(self.key_path.read_text())
        except FileNotFoundError:
            pass
        except (OSError, keys.InvalidKeyError) as exc:
            log.warning("the mesh key %s is unusable (%s); making a new one", self.key_path, exc)
        private = keys.generate_private()
        write_atomically(self.key_path, private + "\n", 0o600)
        return private

    # ------------------------------------------------------------ up and down

    def _new_device(self) -> Device:
        return new_device(self.interface, self.pid_path, self.log_path)

    def enable(self, listen_port: int) -> list[str]:
        """Turn the mesh on (or move it to another port); what was done, for the log."""
        state = self.state or MeshState(listen_port=listen_port)
        if state.listen_port != listen_port:
            state = MeshState(listen_port=listen_port, peers=state.peers)
        self._save(state)
        return self.up()

    def up(self) -> list[str]:
        """The interface as the state says: device, key, port, link, peers and routes."""
        state = self.state
        if state is None:
            return []
        device = self.device or self._new_device()
        try:
            done: list[str] = [device.start()]
            private = self._private_key()
            held = device.get()
            # Peers already there: a device that outlived the daemon, found again.
            adopted = self.device is None and bool(held.peers)
            changes = Changes(
                private_key=private if held.private_key != private else None,
                listen_port=state.listen_port if held.listen_port != state.listen_port else None,
            )
            device.apply(changes)
            self.device = device
            done += self._link_up()
            if not self.configured:
                # A restarted overlayd: what it gave the device before is what the
                # kept blocks say, so an endpoint the device learned since stays.
                for block in state.peers:
                    with contextlib.suppress(keys.InvalidKeyError):
                        endpoint = _resolve(block.endpoint) if block.endpoint else ""
                        if endpoint:
                            self.configured[keys.check(block.wireguard_key)] = endpoint
            done += self.set_peers(state.peers, force=True)
            if adopted:
                done += self._renew_sessions()
            done += self._widen()
        except MeshError as exc:
            self.reason = str(exc)
            raise
        self.reason = ""
        return [line for line in done if line]

    def _link_up(self) -> list[str]:
        done: list[str] = []
        with IPRoute() as ip:
            found = ip.link_lookup(ifname=self.interface)
            if not found:
                raise MeshError(f"the WireGuard interface {self.interface} vanished")
            index = found[0]
            have = {(a.get("address"), a["prefixlen"]) for a in ip.get_addr(family=2, index=index)}
            if (str(self.gateway), 32) not in have:
                ip.addr("add", index=index, address=str(self.gateway), prefixlen=32)
                done.append(f"gave {self.interface} the address {self.gateway}/32")
            link = ip.get_links(index)[0]
            if link.get_attr("IFLA_OPERSTATE") == "DOWN" or not link["flags"] & 1:
                ip.link("set", index=index, state="up")
                done.append(f"brought {self.interface} up")
        return done

    def down(self) -> list[str]:
        """Stop the interface and forget the mesh (``--remove-network``)."""
        done: list[str] = []
        device = self.device or self._new_device()
        if device.stop():
            done.append(f"the mesh interface {self.interface} ({device.implementation})")
        self.device = None
        self.state = None
        for path in (self.state_path, self.key_path, self.pid_path, self.log_path):
            path.unlink(missing_ok=True)
        return done

    def rotate(self) -> str:
        """A new key pair for the running interface; the new public key."""
        if self.device is None:
            raise MeshError("the mesh is off; turn it on with EnableMesh first")
        private = keys.generate_private()
        self.device.apply(Changes(private_key=private))
        write_atomically(self.key_path, private + "\n", 0o600)
        return keys.public_of(private)

    # ------------------------------------------------------------ peers

    def set_peers(self, blocks: list[PeerBlock], force: bool = False) -> list[str]:
        """Peers and routes for the blocks that carry a key; what changed, for the log."""
        state = self.state
        if state is None or self.device is None:
            return []
        mine = [b for b in blocks if b.wireguard_key and b.subnet != str(self.subnet)]
        if mine != state.peers:
            self._save(MeshState(listen_port=state.listen_port, peers=mine))
        elif not force:
            return []
        wanted: list[PeerConfig] = []
        for block in mine:
            try:
                key = keys.check(block.wireguard_key)
            except keys.InvalidKeyError:
                log.warning("the mesh key of node %s is not a WireGuard key; skipped", block.node)
                continue
            wanted.append(
                PeerConfig(
                    public_key=key,
                    endpoint=_resolve(block.endpoint) if block.endpoint else "",
                    allowed_ips=(block.subnet,),
                    keepalive=max(0, block.keepalive),
                )
            )
        changes = plan(self.device.get(), wanted, self.configured)
        self.device.apply(changes)
        for peer in changes.upsert:
            if peer.public_key in changes.with_endpoint:
                self.configured[peer.public_key] = peer.endpoint
        for key in changes.remove:
            self.configured.pop(key, None)
        done = [
            f"mesh peer {p.public_key[:8]}… for {', '.join(p.allowed_ips)}" for p in changes.upsert
        ]
        done += [f"mesh peer {k[:8]}… removed" for k in changes.remove]
        done += self._set_mtu([p.endpoint for p in wanted])
        done += self._set_routes([p.allowed_ips[0] for p in wanted])
        done += self._widen()
        return done

    def _renew_sessions(self) -> list[str]:
        """Every peer with an endpoint handshakes afresh (:func:`~shared.mesh.device.renewal`):
        while this node's daemons were down its record may have lapsed, and the other
        nodes dropped its peer and added it back without the session this device kept
        (and, for a node behind NAT, without an endpoint: only its handshake gives
        them one). What was done, for the log."""
        if self.device is None:
            return []
        removal, again = renewal(self.device.get())
        if not again.upsert:
            return []
        self.device.apply(removal)
        self.device.apply(again)
        return [f"mesh sessions renewed with {len(again.upsert)} peers (a handshake each)"]

    def _widen(self) -> list[str]:
        """wireguard-go's UDP buffers made wide enough for a burst (see
        :mod:`shared.mesh.userspace`): looked at after each change, as it opens its
        sockets anew when its link comes up or its port changes."""
        device = self.device
        if not isinstance(device, userspace.UserspaceDevice):
            return []
        try:
            done = device.widen_buffers()
        except MeshError as exc:
            if str(exc) != self._widen_said:
                self._widen_said = str(exc)
                log.warning("%s", exc)
            return []
        return [done] if done else []

    def _set_mtu(self, endpoints: list[str]) -> list[str]:
        underlay = _underlay_mtu([e.rpartition(":")[0].strip("[]") for e in endpoints if e])
        mtu = max(MIN_MTU, underlay - OVERHEAD)
        with IPRoute() as ip:
            found = ip.link_lookup(ifname=self.interface)
            if not found:
                return []
            have = int(ip.get_links(found[0])[0].get_attr("IFLA_MTU") or 0)
            self.mtu = mtu
            if have == mtu:
                return []
            ip.link("set", index=found[0], mtu=mtu)
        return [f"MTU of {self.interface}: {mtu} (underlay {underlay})"]

    def _set_routes(self, blocks: list[str]) -> list[str]:
        done: list[str] = []
        with IPRoute() as ip:
            found = ip.link_lookup(ifname=self.interface)
            if not found:
                return []
            index = found[0]
            held: dict[str, int] = {}
            for route in ip.get_routes(family=socket.AF_INET, proto=MESH_ROUTE_PROTO):
                held[f"{route.get_attr('RTA_DST')}/{route['dst_len']}"] = int(
                    route.get_attr("RTA_OIF") or 0
                )
            for dst, oif in held.items():
                if dst not in blocks and oif == index:
                    with contextlib.suppress(NetlinkError):
                        ip.route("del", dst=dst, proto=MESH_ROUTE_PROTO, oif=index)
                        done.append(f"route to {dst} through the mesh removed")
            for dst in blocks:
                if held.get(dst) == index:
                    continue
                try:
                    ip.route(
                        "replace",
                        dst=dst,
                        oif=index,
                        prefsrc=str(self.gateway),
                        proto=MESH_ROUTE_PROTO,
                    )
                    done.append(f"route to {dst} through the mesh")
                except NetlinkError as exc:
                    done.append(f"no route to {dst} through the mesh: {os.strerror(exc.code)}")
        return done

    # ------------------------------------------------------------ reading

    def status(self) -> MeshStatus:
        """What GetMesh answers; a device that stopped answering is reported off, with why."""
        state, device = self.state, self.device
        reason = self.reason or "the mesh is off"
        held = None
        if state is not None and device is not None:
            try:
                held = device.get()
            except MeshError as exc:
                reason = f"{exc}; overlayd starts it again within seconds"
        if state is None or device is None or held is None:
            return MeshStatus(
                enabled=False,
                interface=self.interface if state is not None else "",
                implementation="",
                public_key="",
                listen_port=state.listen_port if state is not None else 0,
                mtu=0,
                address="",
                reason=reason,
            )
        return MeshStatus(
            enabled=True,
            interface=self.interface,
            implementation=device.implementation,
            public_key=keys.public_of(held.private_key) if held.private_key else "",
            listen_port=held.listen_port,
            mtu=self.mtu,
            address=str(self.gateway),
            peers=[
                MeshPeer(
                    public_key=p.public_key,
                    endpoint=p.endpoint,
                    allowed_ips=list(p.allowed_ips),
                    last_handshake=p.last_handshake,
                    rx_bytes=p.rx_bytes,
                    tx_bytes=p.tx_bytes,
                    keepalive=p.keepalive,
                )
                for p in held.peers
            ],
        )

    def node_of(self, public_key: str) -> str:
        """The node a peer key belongs to, for metric labels (the key if unknown)."""
        for block in self.state.peers if self.state else []:
            if block.wireguard_key == public_key:
                return block.node
        return public_key


def _underlay_mtu(hosts: list[str]) -> int:
    """The smallest MTU on the routes to ``hosts`` (the default route's if none)."""
    targets = hosts or ["192.0.2.1"]  # TEST-NET-1: whatever the default route is
    found: list[int] = []
    with IPRoute() as ip:
        for host in targets:
            try:
                routes = ip.route("get", dst=host)
            except (NetlinkError, ValueError):
                continue
            for route in routes:
                metrics = route.get_attr("RTA_METRICS")
                attrs = dict(metrics.get("attrs", [])) if metrics else {}
                if attrs.get("RTAX_MTU"):
                    found.append(int(attrs["RTAX_MTU"]))
                    continue
                oif = route.get_attr("RTA_OIF")
                if oif:
                    links = ip.get_links(oif)
                    if links:
                        found.append(int(links[0].get_attr("IFLA_MTU") or DEFAULT_UNDERLAY_MTU))
    return min(found) if found else DEFAULT_UNDERLAY_MTU
