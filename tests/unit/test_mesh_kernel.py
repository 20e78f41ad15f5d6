"""The kernel's WireGuard where the kernel has it: the choice of device, and what is said
to and read from it through pyroute2's own WireGuard messages (encoded and decoded by
pyroute2, as netlink carries them; this machine has no module to send them to)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pyroute2.netlink.generic.wireguard import AsyncWireGuard, wgmsg

from daemons.overlayd.mesh import new_device
from shared.mesh import keys
from shared.mesh.device import PeerConfig, plan
from shared.mesh.kernel import (
    KernelDevice,
    allowed_ip_text,
    device_state,
    endpoint_text,
    peer_settings,
)
from shared.mesh.userspace import UserspaceDevice

KEY = keys.public_of(keys.generate_private())
PRIVATE = keys.generate_private()


def test_the_kernel_module_is_used_where_it_is_loaded_else_wireguard_go(tmp_path: Path) -> None:
    module = tmp_path / "wireguard"
    files = (tmp_path / "wg.pid", tmp_path / "wg.log")
    chosen = new_device("zlb0-wg", *files, kernel_module=module)
    assert isinstance(chosen, UserspaceDevice) and chosen.implementation == "wireguard-go"
    module.mkdir()
    chosen = new_device("zlb0-wg", *files, kernel_module=module)
    assert isinstance(chosen, KernelDevice) and chosen.implementation == "kernel"
    assert chosen.name == "zlb0-wg"


def _as_sent(settings: dict[str, object]) -> wgmsg:
    """The set message pyroute2 builds for one peer, encoded and decoded again."""
    builder = object.__new__(AsyncWireGuard)  # its message building needs no socket
    msg = wgmsg()
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "zlb0-wg"])
    msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", PRIVATE])
    msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", 51820])
    builder._wg_set_peer(msg, settings)
    msg["cmd"], msg["version"] = 1, 1
    msg.encode()
    back = wgmsg(msg.data)
    back.decode()
    return back


@pytest.mark.parametrize(
    ("endpoint", "host"), [("192.0.2.7:51820", "192.0.2.7"), ("[fd00::7]:51820", "fd00::7")]
)
def test_a_new_peer_is_sent_with_its_endpoint_and_read_back_as_wireguard_go_writes_it(
    endpoint: str, host: str
) -> None:
    wanted = PeerConfig(KEY, endpoint, ("10.89.3.0/24",), 2)
    settings = peer_settings(wanted, with_endpoint=True)
    assert settings["endpoint_addr"] == host and settings["endpoint_port"] == 51820
    state = device_state([_as_sent(settings)])
    assert state.private_key == PRIVATE and state.listen_port == 51820
    (peer,) = state.peers
    assert (peer.public_key, peer.endpoint, peer.allowed_ips, peer.keepalive) == (
        KEY,
        endpoint,
        ("10.89.3.0/24",),
        2,
    )
    # read back, the peer is what was wanted: nothing to change next time
    assert not plan(state, [wanted], {KEY: endpoint})


def test_a_peer_without_its_endpoint_keeps_the_one_the_device_learned() -> None:
    # behind NAT: the record gives no endpoint; a roamed one is never sent over
    settings = peer_settings(PeerConfig(KEY, "", ("10.89.3.0/24",), 2), with_endpoint=True)
    assert "endpoint_addr" not in settings
    changed = peer_settings(PeerConfig(KEY, "192.0.2.7:51820", ("10.89.4.0/24",), 2), False)
    assert "endpoint_addr" not in changed and changed["replace_allowed_ips"] is True
    (peer,) = device_state([_as_sent(changed)]).peers
    assert peer.endpoint == "" and peer.allowed_ips == ("10.89.4.0/24",)


def test_allowed_ips_and_endpoints_read_in_every_form_the_device_gives() -> None:
    assert allowed_ip_text(socket.AF_INET, "0a:59:03:00", 24) == "10.89.3.0/24"
    assert allowed_ip_text(socket.AF_INET, bytes([10, 89, 3, 0]), 24) == "10.89.3.0/24"
    v6 = socket.inet_pton(socket.AF_INET6, "fd00::")
    assert allowed_ip_text(socket.AF_INET6, v6, 64) == "fd00::/64"
    assert allowed_ip_text(socket.AF_INET6, ":".join(f"{b:02x}" for b in v6), 64) == "fd00::/64"
    assert allowed_ip_text(socket.AF_INET, "10.89.3.0", 24) == "10.89.3.0/24"
    assert endpoint_text({}) == "" and endpoint_text({"addr": "", "port": 0}) == ""
    assert endpoint_text({"addr": "fd00::7", "port": 9}) == "[fd00::7]:9"
