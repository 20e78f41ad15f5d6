"""The cluster's blocks and voters, as pure logic: settings checked, blocks picked."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cluster.blocks import BlocksError, block_of, first_free, is_voter, make_settings


def test_settings_are_checked_with_one_sentence() -> None:
    assert make_settings("10.213.0.0/16").block_prefix == 24
    assert make_settings(" 10.90.0.0/16 ", voters=5).voters == 5
    for bad in ("10.213.0.0/33", "fd00::/64", "nothing"):
        with pytest.raises(BlocksError, match="is not an IPv4 subnet"):
            make_settings(bad)
    with pytest.raises(BlocksError, match="no room for blocks of /24"):
        make_settings("10.213.0.0/24")
    for voters in (0, 2, 4, 9):
        with pytest.raises(BlocksError, match="odd number up to 7"):
            make_settings("10.213.0.0/16", voters=voters)


def test_the_lowest_free_block_is_taken_the_first_last_and_none_when_all_are_held() -> None:
    wide = make_settings("10.90.0.0/22")
    # the first block holds every lone node's gateway (10.90.0.1): handed out last
    assert first_free(wide, []) == "10.90.1.0/24"
    assert first_free(wide, ["10.90.1.0/24", "10.90.3.0/24"]) == "10.90.2.0/24"
    assert first_free(wide, ["10.90.1.0/24", "10.90.2.0/24", "10.90.3.0/24"]) == "10.90.0.0/24"
    full = [f"10.90.{k}.0/24" for k in range(4)]
    assert first_free(wide, full) is None


def test_a_first_node_with_replicas_keeps_the_block_of_its_gateway() -> None:
    wide = make_settings("10.213.0.0/16")
    assert block_of(wide, "10.213.0.1") == "10.213.0.0/24"
    assert block_of(wide, "10.213.7.1") == "10.213.7.0/24"
    assert block_of(wide, "192.168.1.1") is None  # outside the range


def test_a_joining_node_is_a_voter_while_there_are_fewer_than_the_cluster_wants() -> None:
    assert is_voter(2, None) and not is_voter(3, None)  # 3 without settings
    five = make_settings("10.213.0.0/16", voters=5)
    assert [is_voter(n, five) for n in range(1, 8)] == [True] * 4 + [False] * 3


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.integers(min_value=16, max_value=22),
    held=st.sets(st.integers(min_value=0, max_value=63), max_size=64),
)
def test_a_free_block_is_in_the_range_the_block_size_and_never_held(
    prefix: int, held: set[int]
) -> None:
    wide = make_settings(f"10.0.0.0/{prefix}", block_prefix=prefix + 6)
    all_blocks = list(IPv4Network(wide.subnet).subnets(new_prefix=prefix + 6))
    used = [str(all_blocks[k]) for k in held]
    found = first_free(wide, used)
    if len(held) == len(all_blocks):
        assert found is None
        return
    assert found is not None and found not in used
    block = IPv4Network(found)
    assert block.prefixlen == prefix + 6 and block.subnet_of(IPv4Network(wide.subnet))


def test_node_inits_options_cross_in_its_one_argument() -> None:
    from daemons.schedd.cluster_blocks import parse_init
    from shared.bus import InvalidArgumentError
    from shared.cluster.blocks import InitOptions, init_argument

    assert init_argument("10.0.0.1") == "10.0.0.1"  # no option: the address alone, as before
    assert parse_init("10.0.0.1") == InitOptions(advertise="10.0.0.1")
    assert parse_init("") == InitOptions()
    sent = init_argument("10.0.0.1", "10.90.0.0/16", 5)
    assert parse_init(sent) == InitOptions("10.0.0.1", "10.90.0.0/16", 5)
    assert parse_init(init_argument("", "", 7)).etcd_voters == 7
    with pytest.raises(InvalidArgumentError, match="options do not read"):
        parse_init('{"etcd_voters": "many"}')


def test_overlayd_not_answering_is_one_sentence_at_init_and_join() -> None:
    import asyncio

    from daemons.schedd.cluster_blocks import ask
    from shared.bus import InvalidArgumentError, UnavailableError

    async def gone() -> None:
        raise ConnectionRefusedError("no zlayer-overlayd on the bus")

    async def refused() -> None:
        raise InvalidArgumentError("a sentence of its own")

    with pytest.raises(UnavailableError, match=r"zlayer-overlayd does not answer \(no zlayer"):
        asyncio.run(ask(gone()))
    with pytest.raises(InvalidArgumentError, match="a sentence of its own"):
        asyncio.run(ask(refused()))
