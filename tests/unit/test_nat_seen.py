"""A joining node is behind NAT when the node it joined through saw the join come from
another address than the one it advertises; its record says so, with the reason."""

from __future__ import annotations

from daemons.schedd.backend import ClusterSettings
from daemons.schedd.cluster import mesh_fields, nat_seen


def test_another_source_than_the_advertised_address_is_nat_with_both_named() -> None:
    reason = nat_seen("192.168.7.2", "203.0.113.5")
    assert "behind NAT" in reason and "203.0.113.5" in reason and "192.168.7.2" in reason


def test_the_same_address_no_source_and_loopback_are_not_nat() -> None:
    assert nat_seen("10.0.0.2", "10.0.0.2") == ""
    assert nat_seen("fd00::2", "fd00:0::2") == ""
    assert nat_seen("10.0.0.2", "") == ""  # an older node sends none
    assert nat_seen("10.0.0.2", "127.0.0.1") == ""  # a node on the same host
    assert nat_seen("node.example", "10.0.0.3") == ""  # not an address: nothing to compare


def test_nat_seen_at_join_makes_the_record_unreachable_without_behind_nat() -> None:
    reason = nat_seen("192.168.7.2", "203.0.113.5")
    fields = mesh_fields(ClusterSettings(), None, reason)
    assert fields["reachable"] is False and fields["reachability"] == reason
    assert mesh_fields(ClusterSettings(), None)["reachable"] is True
