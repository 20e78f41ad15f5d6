"""Node commands asked of a cluster member's schedd before it has reached its cluster
(right after a restart) say it is starting, not that the node is in no cluster: the
latter sends a user to ``node init`` on a member. cluster.toml, looked at to tell
the two apart, is read off the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

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


def test_a_member_still_reaching_its_cluster_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths(tmp_path)
    control = NodeControl(paths, _Starting())  # type: ignore[arg-type]
    read_on_the_loop: list[bool] = []
    real_load = cluster_config.load

    def load(given: Paths) -> Any:
        read_on_the_loop.append(threading.get_ident() == loop_thread)
        return real_load(given)

    monkeypatch.setattr(cluster_config, "load", load)
    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread

    with pytest.raises(InvalidArgumentError, match="not in a cluster"):
        asyncio.run(control.list_nodes())
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
        asyncio.run(control.drain("n2-abcdef"))
    assert "waits for etcd" in str(raised.value)
    assert "node init" not in str(raised.value)
    assert read_on_the_loop == [False, False]
