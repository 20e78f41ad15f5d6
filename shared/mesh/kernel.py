"""The kernel's WireGuard, through pyroute2 (rtnetlink for the link, generic netlink for
its configuration), where the kernel has the module (``/sys/module/wireguard``).

Not exercised by this project's tests: the machines they run on have no
WireGuard module, so the mesh runs on ``wireguard-go`` there
(:mod:`shared.mesh.userspace`). The calls follow pyroute2's WireGuard API.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from shared.mesh.device import Changes, DeviceState, MeshError, PeerState

MODULE = Path("/sys/module/wireguard")


def available() -> bool:
    return MODULE.is_dir()


def _b64(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode() if len(value) == 44 else base64.b64encode(value).decode()
    return str(value or "")


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
        private_key, listen_port = "", 0
        peers: list[PeerState] = []
        for msg in messages:
            private_key = _b64(msg.get_attr("WGDEVICE_A_PRIVATE_KEY")) or private_key
            listen_port = int(msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port)
            for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
                endpoint = peer.get_attr("WGPEER_A_ENDPOINT") or {}
                handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                allowed = []
                for item in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []:
                    addr = item.get_attr("WGALLOWEDIP_A_IPADDR")
                    mask = item.get_attr("WGALLOWEDIP_A_CIDR_MASK")
                    allowed.append(f"{addr}/{mask}")
                seconds = float(handshake.get("tv_sec", 0)) + handshake.get("tv_nsec", 0) / 1e9
                peers.append(
                    PeerState(
                        public_key=_b64(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
                        endpoint=(
                            f"{endpoint['addr']}:{endpoint['port']}" if endpoint.get("addr") else ""
                        ),
                        allowed_ips=tuple(allowed),
                        keepalive=int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                        last_handshake=seconds,
                        rx_bytes=int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
                        tx_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
                    )
                )
        return DeviceState(private_key=private_key, listen_port=listen_port, peers=tuple(peers))

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
                    item: dict[str, Any] = {
                        "public_key": peer.public_key,
                        "persistent_keepalive": peer.keepalive,
                        "replace_allowed_ips": True,
                        "allowed_ips": list(peer.allowed_ips),
                    }
                    if peer.public_key in changes.with_endpoint and peer.endpoint:
                        host, _, port = peer.endpoint.rpartition(":")
                        item["endpoint_addr"] = host.strip("[]")
                        item["endpoint_port"] = int(port)
                    wg.set(self.name, peer=item)
        except (NetlinkError, ValueError) as exc:
            raise MeshError(f"cannot configure the WireGuard link {self.name}: {exc}") from None
