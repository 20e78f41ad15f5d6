"""overlayd's pure parts: IPAM arithmetic and persistence, names, settings, the nft ruleset."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.overlayd import nft
from daemons.overlayd.ipam import Allocation, ExhaustedError, Ipam, IpamError, capacity
from daemons.overlayd.plumbing import mac_for, names_for
from daemons.overlayd.settings import DEFAULT_SUBNET, OverlaySettings, host_resolvers
from shared.config import ConfigError
from shared.paths import Paths

# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    ("subnet", "first", "last", "count"),
    [
        ("10.213.0.0/16", "10.213.0.2", "10.213.255.254", 65533),
        ("10.231.7.0/24", "10.231.7.2", "10.231.7.254", 253),
        ("10.231.7.4/30", "10.231.7.6", "10.231.7.6", 1),
    ],
)
def test_usable_range_skips_network_gateway_and_broadcast(
    subnet: str, first: str, last: str, count: int
) -> None:
    ipam = Ipam(IPv4Network(subnet))
    assert ipam.gateway == IPv4Network(subnet).network_address + 1
    assert (str(ipam.first), str(ipam.last)) == (first, last)
    assert capacity(ipam.subnet) == count


def test_a_subnet_without_room_is_refused() -> None:
    with pytest.raises(IpamError):
        Ipam(IPv4Network("10.231.0.0/31"))


def test_allocate_is_idempotent_per_container() -> None:
    ipam = Ipam(IPv4Network("10.231.0.0/24"))
    a = ipam.allocate("a", "web-1")
    assert a.address == IPv4Address("10.231.0.2")
    assert ipam.allocate("a") == a
    assert ipam.allocate("b").address == IPv4Address("10.231.0.3")
    assert len(ipam) == 2


def test_exhaustion_is_one_sentence() -> None:
    ipam = Ipam(IPv4Network("10.231.0.0/29"))
    for i in range(capacity(ipam.subnet)):
        ipam.allocate(f"c{i}")
    with pytest.raises(ExhaustedError) as caught:
        ipam.allocate("one-more")
    message = str(caught.value)
    assert "10.231.0.0/29" in message and "5 in use" in message
    assert "\n" not in message and message.count(". ") == 0


def test_released_addresses_are_reused_last() -> None:
    ipam = Ipam(IPv4Network("10.231.0.0/29"))  # .2 .. .6
    for name in "abc":
        ipam.allocate(name)
    ipam.release("a")  # .2 free, but .5 and .6 come first
    assert [ipam.allocate(n).address.packed[3] for n in "de"] == [5, 6]
    assert ipam.allocate("f").address.packed[3] == 2  # wrapped around
    with pytest.raises(ExhaustedError):
        ipam.allocate("g")


def test_release_of_unknown_is_none() -> None:
    assert Ipam(IPv4Network("10.231.0.0/24")).release("nobody") is None


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.integers(min_value=22, max_value=30),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=40)), max_size=120),
)
def test_allocations_are_unique_usable_and_counted(
    prefix: int, ops: list[tuple[bool, int]]
) -> None:
    subnet = IPv4Network(f"10.231.0.0/{prefix}")
    ipam = Ipam(subnet)
    model: dict[str, IPv4Address] = {}
    for allocate, n in ops:
        cid = f"c{n}"
        if allocate:
            if cid not in model and len(model) == capacity(subnet):
                with pytest.raises(ExhaustedError):
                    ipam.allocate(cid)
                continue
            address = ipam.allocate(cid).address
            assert model.setdefault(cid, address) == address
        else:
            released = ipam.release(cid)
            assert (released.address if released else None) == model.pop(cid, None)
    addresses = [a.address for a in ipam.all()]
    assert len(set(addresses)) == len(addresses) == len(model) == len(ipam)
    for address in addresses:
        assert address in subnet
        assert address not in (subnet.network_address, ipam.gateway, subnet.broadcast_address)
    assert {a.container_id: a.address for a in ipam.all()} == model


# ---------------------------------------------------------------- persistence


def test_allocations_survive_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "state" / "allocations.json"
    subnet = IPv4Network("10.231.0.0/24")
    ipam = Ipam.load(subnet, path)
    a = ipam.allocate("a", "web-1", "zl-aaa", "zlvaaa")
    b = ipam.allocate("b")
    ipam.release("a")
    c = ipam.allocate("c")

    again = Ipam.load(subnet, path)
    assert again.all() == [b, c]
    assert again.get("a") is None
    # The cursor is persisted too: the next address continues after c's.
    assert again.allocate("d").address == c.address + 1
    record = json.loads(path.read_text())
    assert record["version"] == 1 and record["subnet"] == "10.231.0.0/24"
    assert a.address not in {x.address for x in again.all()}
    assert not list(path.parent.glob(".allocations.json.*")), "a temporary file was left"


def test_saved_metadata_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "allocations.json"
    subnet = IPv4Network("10.231.0.0/24")
    made = Ipam.load(subnet, path).allocate("a", "web-1", "zl-aaa", "zlvaaa")
    assert Ipam.load(subnet, path).get("a") == made


def test_records_outside_a_changed_subnet_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "allocations.json"
    old = Ipam.load(IPv4Network("10.231.0.0/24"), path)
    old.allocate("a")
    new = Ipam.load(IPv4Network("10.231.1.0/24"), path)
    assert len(new) == 0 and [d.container_id for d in new.dropped] == ["a"]


@pytest.mark.parametrize(
    "content", ["{not json", '{"version": 99}', '{"version": 1, "allocations": 3}']
)
def test_a_corrupt_state_file_is_moved_aside_and_allocations_start_empty(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "allocations.json"
    path.write_text(content)
    ipam = Ipam.load(IPv4Network("10.231.0.0/24"), path)
    assert len(ipam) == 0
    (aside,) = tmp_path.glob("allocations.json.corrupt-*")
    assert aside.read_text() == content
    # What the node still runs is taken back, and saved in a good file again.
    assert ipam.adopt(Allocation("a", IPv4Address("10.231.0.9"), "web"))
    assert not ipam.adopt(Allocation("b", IPv4Address("10.231.0.9")))  # held by a
    assert not ipam.adopt(Allocation("c", IPv4Address("10.231.7.9")))  # not this subnet
    again = Ipam.load(IPv4Network("10.231.0.0/24"), path)
    assert [(a.container_id, str(a.address)) for a in again.all()] == [("a", "10.231.0.9")]
    assert again.allocate("d").address != IPv4Address("10.231.0.9")


def test_without_a_path_nothing_is_written(tmp_path: Path) -> None:
    Ipam(IPv4Network("10.231.0.0/24")).allocate("a")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- names


@given(bridge=st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True), cid=st.text(min_size=1))
def test_names_are_short_unique_per_bridge_and_stable(bridge: str, cid: str) -> None:
    names = names_for(bridge, cid)
    assert names == names_for(bridge, cid)
    assert len(names.host_veth) <= 15 and len(names.peer) <= 15
    assert names.netns.startswith("zl-") and names.host_veth[3:] == names.netns[3:]
    assert names_for(bridge + "x" if len(bridge) < 15 else bridge[:-1], cid) != names


def test_mac_is_derived_from_the_address() -> None:
    assert mac_for(IPv4Address("10.213.1.2")) == "02:5a:0a:d5:01:02"


# ---------------------------------------------------------------- settings


def _settings(tmp_path: Path, text: str) -> OverlaySettings:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    paths.daemon_config("overlayd").write_text(text)
    return OverlaySettings.load("overlayd", paths)


def test_defaults_stay_clear_of_podman(tmp_path: Path) -> None:
    loaded = _settings(tmp_path, "")
    assert loaded.bridge == "zlayer0" and loaded.subnet == DEFAULT_SUBNET
    assert not loaded.subnet.overlaps(IPv4Network("10.88.0.0/16"))
    assert loaded.table == "zlayer" and loaded.nameservers is None


def test_table_follows_the_bridge(tmp_path: Path) -> None:
    assert _settings(tmp_path, 'bridge = "zlt-1.a"').table == "zlayer_zlt_1_a"
    assert _settings(tmp_path, 'nft_table = "mine"').table == "mine"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZLAYER_OVERLAYD_SUBNET", "10.231.9.0/24")
    monkeypatch.setenv("ZLAYER_OVERLAYD_NAMESERVERS", '["9.9.9.9"]')
    loaded = _settings(tmp_path, 'subnet = "10.231.8.0/24"\n')
    assert loaded.subnet == IPv4Network("10.231.9.0/24") and loaded.nameservers == ["9.9.9.9"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('bridge = "much-too-long-name"', "bridge"),
        ('bridge = "a/b"', "bridge"),
        ('subnet = "10.231.0.0/31"', "subnet"),
        ('subnet = "10.231.0.1/24"', "subnet"),
        ('nameservers = ["not-an-ip"]', "nameservers"),
        ('nft_table = "no spaces"', "nft_table"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, text)
    assert f"`{key}" in str(caught.value) and "overlayd.toml" in str(caught.value)


def test_host_resolvers_skip_loopback() -> None:
    text = """# generated
nameserver 127.0.0.53
nameserver 10.255.255.53
nameserver ::1
nameserver fe80::1%eth0
nameserver 2001:db8::53 ; comment
search corp.example  lab.example
options edns0
"""
    usable, skipped, search = host_resolvers(text)
    assert usable == ["10.255.255.53", "2001:db8::53"]
    assert skipped == ["127.0.0.53", "::1", "fe80::1"]
    assert search == ["corp.example", "lab.example"]


def test_host_resolvers_of_nothing() -> None:
    assert host_resolvers("") == ([], [], [])


# ---------------------------------------------------------------- nftables


def test_ruleset_replaces_the_whole_table_and_masquerades_only_leaving_traffic() -> None:
    text = nft.ruleset("zlayer_t", "zlt0", IPv4Network("10.231.3.0/24"))
    lines = [line.strip() for line in text.splitlines()]
    # Declare, delete, recreate: one transaction, idempotent.
    assert lines[:3] == ["table ip zlayer_t {}", "delete table ip zlayer_t", "table ip zlayer_t {"]
    assert any(
        line.startswith('ip saddr 10.231.3.0/24 oifname != "zlt0" masquerade') for line in lines
    )
    assert "type nat hook postrouting priority srcnat; policy accept;" in lines
    assert "type filter hook forward priority filter; policy drop;" in lines
    assert 'iifname "zlt0" ip daddr 127.0.0.0/8 drop comment "the node\'s loopback"' in lines
