"""shared.mesh: WireGuard keys, the userspace protocol's parser and writer, the peer plan."""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.overlayd import nft
from daemons.overlayd.mesh import Mesh, MeshState, interface_name
from shared.mesh import keys
from shared.mesh.device import (
    Changes,
    DeviceState,
    MeshError,
    PeerConfig,
    PeerState,
    plan,
    renewal,
)
from shared.mesh.uapi import format_set, parse_get
from shared.wire.traffic import PeerBlock

A = keys.public_of(keys.generate_private())
B = keys.public_of(keys.generate_private())

# What wireguard-go answers to get=1 for a device with two peers (keys replaced).
GET_ANSWER = (
    "private_key={priv}\n"
    "listen_port=51820\n"
    "public_key={a}\n"
    "preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.7:51820\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=148\n"
    "rx_bytes=92\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.89.3.0/24\n"
    "allowed_ip=10.89.4.0/24\n"
    "public_key={b}\n"
    "protocol_version=1\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n"
    "\n"
)


def test_keys_are_what_wg_makes() -> None:
    private = keys.generate_private()
    raw = base64.b64decode(private)
    assert len(private) == 44 and len(raw) == 32
    assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64  # clamped as wg genkey
    assert keys.from_hex(keys.to_hex(private)) == private
    if shutil.which("wg"):
        made = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True)
        assert made.stdout.strip() == keys.public_of(private)


@pytest.mark.parametrize("bad", ["", "abc", base64.b64encode(b"x" * 31).decode(), "!" * 44])
def test_a_bad_key_is_one_sentence(bad: str) -> None:
    with pytest.raises(keys.InvalidKeyError, match="32 bytes in base64"):
        keys.check(bad)


def test_get_answer_is_parsed() -> None:
    private = keys.generate_private()
    text = GET_ANSWER.format(priv=keys.to_hex(private), a=keys.to_hex(A), b=keys.to_hex(B))
    state = parse_get(text)
    assert state.private_key == private and state.listen_port == 51820
    first, second = state.peers
    assert first == PeerState(
        public_key=A,
        endpoint="192.0.2.7:51820",
        allowed_ips=("10.89.3.0/24", "10.89.4.0/24"),
        keepalive=25,
        last_handshake=1700000000.5,
        rx_bytes=92,
        tx_bytes=148,
    )
    assert second == PeerState(public_key=B)


def test_get_error_and_garbage_are_mesh_errors() -> None:
    with pytest.raises(MeshError, match="refused get"):
        parse_get("errno=13\n\n")
    with pytest.raises(MeshError, match="without an errno"):
        parse_get("listen_port=1\n\n")
    with pytest.raises(MeshError, match="unreadable"):
        parse_get("public_key=zz\nerrno=0\n\n")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_any_answer_parses_or_is_a_mesh_error(text: str) -> None:
    with contextlib.suppress(MeshError):
        parse_get(text)


def test_set_names_only_what_changes() -> None:
    private = keys.generate_private()
    changes = Changes(
        private_key=private,
        listen_port=51820,
        upsert=(PeerConfig(A, "192.0.2.7:51820", ("10.89.3.0/24",), 25),),
        with_endpoint=frozenset({A}),
        remove=(B,),
    )
    assert format_set(changes) == (
        f"set=1\nprivate_key={keys.to_hex(private)}\nlisten_port=51820\n"
        f"public_key={keys.to_hex(B)}\nremove=true\n"
        f"public_key={keys.to_hex(A)}\nendpoint=192.0.2.7:51820\n"
        "persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
        "allowed_ip=10.89.3.0/24\n\n"
    )
    assert format_set(Changes()) == "set=1\n\n"


def test_plan_leaves_unchanged_peers_and_roamed_endpoints_alone() -> None:
    held = DeviceState(
        peers=(
            PeerState(A, "198.51.100.9:40000", ("10.89.3.0/24",), 25),  # roamed behind NAT
            PeerState(B, "192.0.2.8:51820", ("10.89.4.0/24",), 0),
        )
    )
    same = [
        PeerConfig(A, "192.0.2.7:51820", ("10.89.3.0/24",), 25),
        PeerConfig(B, "192.0.2.8:51820", ("10.89.4.0/24",), 0),
    ]
    configured = {A: "192.0.2.7:51820", B: "192.0.2.8:51820"}
    assert not plan(held, same, configured)
    # B's block grows, A goes, C is new.
    c = keys.public_of(keys.generate_private())
    changes = plan(
        held,
        [
            PeerConfig(B, "192.0.2.8:51820", ("10.89.4.0/23",), 0),
            PeerConfig(c, "192.0.2.9:51820", ("10.89.5.0/24",), 0),
        ],
        configured,
    )
    assert changes.remove == (A,)
    assert [p.public_key for p in changes.upsert] == [B, c]
    assert changes.with_endpoint == {c}
    # A configured endpoint that changes is set again.
    moved = plan(held, [PeerConfig(B, "192.0.2.99:51820", ("10.89.4.0/24",), 0)], configured)
    assert moved.with_endpoint == {B}


def test_mesh_interface_names_fit_and_differ() -> None:
    assert interface_name("zlayer0") == "zlayer0-wg"
    long_names = [interface_name(f"zlayer-bridge{n}") for n in range(50)]
    assert all(len(name) <= 15 for name in long_names)
    assert len(set(long_names)) == 50


def test_the_table_clamps_mss_into_the_mesh_before_any_accept() -> None:
    from ipaddress import IPv4Network

    plain = nft.ruleset("t", "br0", IPv4Network("10.1.0.0/24"))
    assert "maxseg" not in plain and "br0-wg" not in plain
    text = nft.ruleset("t", "br0", IPv4Network("10.1.0.0/24"), mesh="br0-wg")
    forward = text.split("chain forward {", 1)[1].split("}", 1)[0].splitlines()
    rules = [line.strip() for line in forward if line.strip() and "hook" not in line]
    assert rules[0].startswith('oifname "br0-wg" tcp flags syn / syn,rst tcp option maxseg')
    assert 'iifname "br0-wg" oifname "br0" ip saddr @peer_blocks accept' in text
    assert 'iifname "br0" oifname "br0-wg" ip daddr @peer_blocks accept' in text


def test_renewal_drops_and_adds_back_each_peer_with_an_endpoint_as_it_is() -> None:
    held = DeviceState(
        peers=(
            PeerState(A, "198.51.100.9:40000", ("10.89.3.0/24",), 2, last_handshake=1.0),
            PeerState(B, "", ("10.89.4.0/24",), 2),  # behind NAT, not heard from: kept
        )
    )
    removal, again = renewal(held)
    assert removal == Changes(remove=(A,))
    assert again == Changes(
        upsert=(PeerConfig(A, "198.51.100.9:40000", ("10.89.3.0/24",), 2),),
        with_endpoint=frozenset({A}),
    )
    assert not any(renewal(DeviceState(peers=(PeerState(B),))))


class FakeDevice:
    """A device holding peers (one that outlived overlayd) or none (started now)."""

    implementation = "fake"

    def __init__(self, peers: tuple[PeerState, ...]) -> None:
        self.name = "fake-wg"
        self.state = DeviceState(private_key="", listen_port=0, peers=peers)
        self.applied: list[Changes] = []

    def start(self) -> str:
        return "found"

    def stop(self) -> bool:
        return True

    def running(self) -> bool:
        return True

    def get(self) -> DeviceState:
        return self.state

    def apply(self, changes: Changes) -> None:
        self.applied.append(changes)
        kept = [p for p in self.state.peers if p.public_key not in changes.remove]
        kept = [p for p in kept if p.public_key not in {u.public_key for u in changes.upsert}]
        kept += [
            PeerState(u.public_key, u.endpoint, u.allowed_ips, u.keepalive) for u in changes.upsert
        ]
        self.state = DeviceState(
            private_key=changes.private_key or self.state.private_key,
            listen_port=changes.listen_port or self.state.listen_port,
            peers=tuple(kept),
        )


@pytest.mark.parametrize("outlived", [True, False])
def test_a_device_that_outlived_overlayd_handshakes_afresh_with_its_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outlived: bool
) -> None:
    """Its sessions may be ones the other nodes dropped while this node was down."""
    mesh = Mesh("zlb0", IPv4Address("10.89.2.1"), IPv4Network("10.89.2.0/24"), tmp_path)
    block = PeerBlock(
        node="n1",
        subnet="10.89.1.0/24",
        address="192.0.2.7",
        wireguard_key=A,
        endpoint="192.0.2.7:51820",
        keepalive=2,
    )
    mesh.state = MeshState(listen_port=51820, peers=[block])
    held = (PeerState(A, "192.0.2.7:51820", ("10.89.1.0/24",), 2, last_handshake=1.0),)
    device = FakeDevice(held if outlived else ())
    monkeypatch.setattr(mesh, "_new_device", lambda: device)
    for step in ("_link_up", "_set_mtu", "_set_routes", "_widen"):
        monkeypatch.setattr(mesh, step, lambda *args: [])
    done = mesh.up()
    removed = [c.remove for c in device.applied if c.remove]
    assert removed == ([(A,)] if outlived else [])
    assert device.state.peers == (PeerState(A, "192.0.2.7:51820", ("10.89.1.0/24",), 2),)
    assert any("renewed" in line for line in done) == outlived
    # overlayd's later looks at its own device renew nothing
    device.applied.clear()
    mesh.up()
    assert not any(c.remove for c in device.applied)
