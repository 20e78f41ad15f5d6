"""overlayd in a cluster takes the node's block from cluster.toml for its subnet."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import pytest

from daemons.overlayd.settings import OverlaySettings
from shared.cluster import config as cluster_config
from shared.config import ConfigError
from shared.paths import Paths


def _node(tmp_path: Path, block: str) -> Paths:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.daemon_config("overlayd").write_text('subnet = "10.90.0.0/16"\n')
    if block:
        cluster_config.save(
            paths,
            cluster_config.ClusterConfig(
                node_id="n2-abc",
                advertise="10.0.0.12",
                etcd_endpoints=["https://10.0.0.11:2379"],
                files=str(tmp_path / "cluster"),
                block=block,
            ),
        )
    return paths


def test_a_lone_node_keeps_its_subnet_and_a_member_takes_its_block(tmp_path: Path) -> None:
    lone = _node(tmp_path / "lone", "")
    assert OverlaySettings.load("overlayd", lone).subnet == IPv4Network("10.90.0.0/16")
    cluster_config.remove(lone)
    assert OverlaySettings.load("overlayd", lone).subnet == IPv4Network("10.90.0.0/16")
    member = _node(tmp_path / "member", "10.90.3.0/24")
    assert OverlaySettings.load("overlayd", member).subnet == IPv4Network("10.90.3.0/24")


def test_a_bad_block_stops_overlayd_with_a_sentence(tmp_path: Path) -> None:
    paths = _node(tmp_path, "10.90.3.0/33")
    with pytest.raises(ConfigError, match=r"`block`: '10\.90\.3\.0/33' is not an IPv4 subnet"):
        OverlaySettings.load("overlayd", paths)
