"""The kernel's WireGuard, through pyroute2 (rtnetlink for the link, generic netlink for
its configuration), where the kernel has the module (``/sys/module/wireguard``).

The machines this project's tests run on have no WireGuard module, so the
mesh runs on ``wireguard-go`` there (:mod:`shared.mesh.userspace`) and the
netlink calls themselves are not exercised; what they are given is: whether
the module is there (:func:`available`), each peer as pyroute2's WireGuard
``set`` takes it (:func:`peer_settings`), and what the device's dump says
(:func:`device_state`: endpoints and allowed IPs written as wireguard-go's
are, so :func:`~shared.mesh.device.plan` compares like with like).
"""

from __future__ import annotations

import base64
import re
import socket
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from shared.mesh.device import Changes, DeviceState, MeshError, PeerConfig, PeerState

MODULE = Path("/sys/module/wireguard")
_HEX_PAIRS = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){3}(?:(?::[0-9a-fA-F]{2}){12})?")


def available(module: Path = MODULE) -> bool:
    """Whether the kernel has WireGuard: its module is loaded (or built in)."""
    return module.is_dir()


def peer_settings(peer: PeerConfig, with_endpoint: bool) -> dict[str, Any]:
    """One peer as pyroute2's ``WireGuard.set(peer=...)`` takes it: its allowed IPs
    replaced, its endpoint only ``with_endpoint`` (else the device keeps the one it
    learned from handshakes), an IPv6 one without its brackets."""
    item: dict[str, Any] = {
        "public_key": peer.public_key,
        "persistent_keepalive": peer.keepalive,
        "replace_allowed_ips": True,
        "allowed_ips": list(peer.allowed_ips),
    }
    if with_endpoint and peer.endpoint:
        host, _, port = peer.endpoint.rpartition(":")
        item["endpoint_addr"] = host.strip("[]")
        item["endpoint_port"] = int(port)
    return item


def endpoint_text(endpoint: dict[str, Any]) -> str:
    """The device's ``WGPEER_A_ENDPOINT`` as ``host:port`` (``[v6]:port``), "" if none."""
    addr = endpoint.get("addr")
    if not addr:
        return ""
    host = f"[{addr}]" if ":" in str(addr) else str(addr)
    return f"{host}:{endpoint.get('port', 0)}"


def _b64(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode() if len(value) == 44 else base64.b64encode(value).decode()
    return str(value or "")


def allowed_ip_text(family: int, addr: Any, mask: int) -> str:
    """One allowed IP as ``addr/mask``: the device's address comes as bytes, or as
    pyroute2 decodes an attribute of no fixed type, hex pairs ("0a:59:03:00")."""
    if isinstance(addr, str) and _HEX_PAIRS.fullmatch(addr):
        addr = bytes.fromhex(addr.replace(":", ""))
    if isinstance(addr, bytes):
        addr = socket.inet_ntop(family or (socket.AF_INET6 if len(addr) == 16 else 2), addr)
    return f"{addr}/{mask}"


def device_state(messages: list[Any]) -> DeviceState:
    """What the device's dump (pyroute2's ``WireGuard.info``, one message or more when
    its peers do not fit one) says it holds."""
    private_key, listen_port = "", 0
    peers: list[PeerState] = []
    for msg in messages:
        private_key = _b64(msg.get_attr("WGDEVICE_A_PRIVATE_KEY")) or private_key
        listen_port = int(msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port)
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            endpoint = peer.get_attr("WGPEER_A_ENDPOINT") or {}
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
            allowed = [
                allowed_ip_text(
                    int(item.get_attr("WGALLOWEDIP_A_FAMILY") or 0),
                    item.get_attr("WGALLOWEDIP_A_IPADDR"),
                    int(item.get_attr("WGALLOWEDIP_A_CIDR_MASK") or 0),
                )
                for item in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []
            ]
            seconds = float(handshake.get("tv_sec", 0)) + handshake.get("tv_nsec", 0) / 1e9
            peers.append(
                PeerState(
                    public_key=_b64(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
                    endpoint=endpoint_text(endpoint),
                    allowed_ips=tuple(allowed),
                    keepalive=int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                    last_handshake=seconds,
                    rx_bytes=int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
                    tx_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
                )
            )
    return DeviceState(private_key=private_key, listen_port=listen_port, peers=tuple(peers))


class KernelDevice:
    """A ``wireguard`` link made and configured through netlink."""

    implementation = "kernel"

    def __init__(self, name: str) -> None:
        self.name = name

    def running(self) -> bool:
        with IPRoute() as ip:
            return bool(ip.link_lookup(ifname=self.name))

    def start(self) -> str:
        if self.running():
            return f"found the WireGuard link {self.name}"
        try:
            with IPRoute() as ip:
                ip.link("add", ifname=self.name, kind="wireguard")
        except NetlinkError as exc:
            raise MeshError(f"cannot make the WireGuard link {self.name}: {exc}") from None
        return f"made the WireGuard link {self.name}"

    def stop(self) -> bool:
        with IPRoute() as ip:
            found = ip.link_lookup(ifname=self.name)
            if not found:
                return False
            ip.link("del", index=found[0])
        return True

    def get(self) -> DeviceState:
        try:
            with WireGuard() as wg:
                messages = list(wg.info(self.name))
        except NetlinkError as exc:
            raise MeshError(f"cannot read the WireGuard link {self.name}: {exc}") from None
        return device_state(messages)

    def apply(self, changes: Changes) -> None:
        # Generic netlink takes one peer per call here; the device part goes first.
        try:
            with WireGuard() as wg:
                if changes.private_key is not None or changes.listen_port is not None:
                    wg.set(
                        self.name,
                        private_key=changes.private_key,
                        listen_port=changes.listen_port,
                    )
                for key in changes.remove:
                    wg.set(self.name, peer={"public_key": key, "remove": True})
                for peer in changes.upsert:
                    with_endpoint = peer.public_key in changes.with_endpoint
                    wg.set(self.name, peer=peer_settings(peer, with_endpoint))
        except (NetlinkError, ValueError) as exc:
            raise MeshError(f"cannot configure the WireGuard link {self.name}: {exc}") from None
