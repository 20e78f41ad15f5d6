"""overlayd's bridge when its subnet changes (a node that joined a cluster moves
to the block the cluster gave it): the old gateway must leave the bridge, or
this node answers for an address another node's block now holds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from pyroute2 import IPRoute

from daemons.overlayd import plumbing

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netlink)")


@pytest.fixture
def bridge(leak_check: None) -> Iterator[str]:
    name = f"zlmv{os.getpid() % 100000}"
    yield name
    with IPRoute() as ip:
        found = ip.link_lookup(ifname=name)
        if found:
            ip.link("del", index=found[0])


def addresses(bridge: str) -> set[str]:
    with IPRoute() as ip:
        index = ip.link_lookup(ifname=bridge)[0]
        return {f"{r.get_attr('IFA_ADDRESS')}/{r['prefixlen']}" for r in ip.get_addr(index=index)}


def test_a_new_subnet_takes_the_old_gateway_off_the_bridge(bridge: str) -> None:
    plumbing.ensure_bridge(bridge, IPv4Address("10.237.0.1"), 16)
    assert addresses(bridge) == {"10.237.0.1/16"}

    done = plumbing.ensure_bridge(bridge, IPv4Address("10.237.3.1"), 24)

    assert addresses(bridge) == {"10.237.3.1/24"}
    assert f"took 10.237.0.1/16 off {bridge} (the subnet changed)" in done
    # Asked again with the same subnet, nothing changes.
    assert plumbing.ensure_bridge(bridge, IPv4Address("10.237.3.1"), 24) == []
