"""Node commands asked of a cluster member's schedd before it has reached its cluster
(right after a restart) say it is starting, not that the node is in no cluster: the
latter sends a user to ``node init`` on a member."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemons.schedd.cluster import NodeControl
from shared.bus import InvalidArgumentError, UnavailableError
from shared.cluster import config as cluster_config
from shared.paths import Paths


class _Starting:
    """A schedd whose cluster context is not made yet (it waits for etcd)."""

    sqlite = None
    cluster = None

    async def pause(self) -> None:
        return None

    async def resume(self, cluster: object) -> None:
        return None


def test_a_member_still_reaching_its_cluster_says_so(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    control = NodeControl(paths, _Starting())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="not in a cluster"):
        control.list_nodes()
    cluster_config.save(
        paths,
        cluster_config.ClusterConfig(
            node_id="n1-abcdef",
            advertise="192.0.2.1",
            etcd_endpoints=["https://192.0.2.1:2379"],
            files=str(tmp_path / "cluster"),
        ),
    )
    with pytest.raises(UnavailableError) as raised:
        control.list_nodes()
    assert "waits for etcd" in str(raised.value)
    assert "node init" not in str(raised.value)
