"""agentd's ``cgroup_parent`` setting on a real node: its replicas' cgroups live under it
(not ``zlayer``), their stats and OOM kills are read there, ``down`` leaves nothing of it,
and a parent outside a relative cgroup name stops agentd with exit code 78."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.bus import open_bus, resolve_bus_address
from shared.busdaemon import PrivateBus
from shared.clients import AgentClient
from shared.paths import Paths
from shared.wire.agent import ReplicaStats
from tests.e2e.conftest import running_node
from tests.e2e.node import Node, wait_until
from tests.integration.test_daemon import start, stop

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("crun") or not shutil.which("conmon"),
    reason="needs root, crun and conmon (apt-get install crun conmon)",
)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = f"zlayer-x{os.getpid()}"  # "zlayer" in it: the leak check looks for it too
SPEC = """
version: v1
deployment: cgparent
services:
  idle:
    image: zlayer/busybox:latest
    command: {entrypoint: ["sleep", "1000"]}
    resources: {memory: 32Mi, pids_limit: 16}
    stop_grace_period: 1s
    scale: {mode: fixed, replicas: 1}
  hog:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["x=$(head -c 200000000 /dev/zero | tr '\\\\0' a); sleep 1000"]
    resources: {memory: 16Mi}
    restart_policy: {kind: "no"}
    scale: {mode: fixed, replicas: 1}
"""


@pytest.fixture
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node whose agentd has ``cgroup_parent`` set (the daemons keep the environment
    they were started with)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZLAYER_AGENTD_CGROUP_PARENT", PARENT)
        with running_node(
            Path(f"/tmp/zlg-{os.getpid()}"), tmp_path_factory, network_tag="zln"
        ) as started:
            patch.delenv("ZLAYER_AGENTD_CGROUP_PARENT")
            try:
                yield started
            finally:
                started.ctl("down", "cgparent")


def cgroup_dirs(relative: str) -> list[Path]:
    """``relative`` in every cgroup hierarchy that has it."""
    return [d for d in CGROUP_ROOT.glob(f"*/{relative}") if d.is_dir()]


def agent_stats(paths: Paths, replica: str) -> ReplicaStats:
    async def ask() -> ReplicaStats:
        bus = open_bus(resolve_bus_address(paths))
        try:
            return await AgentClient(bus).stats(replica)
        finally:
            bus.close()

    return asyncio.run(ask())


def test_replicas_run_under_agentds_cgroup_parent_and_leave_none_of_it(node: Node) -> None:
    node.ctl("up", "-b", str(node.spec("cgparent", SPEC)), check=True)
    idle = wait_until(
        lambda: next(
            (r for r in node.replicas("cgparent") if r["service"] == "idle" and r["pid"]), None
        ),
        60,
        "the idle replica to run",
    )
    cid = idle["id"]
    # Its cgroup, in every hierarchy, is under the parent and holds its process.
    ours = cgroup_dirs(f"{PARENT}/{cid}")
    assert {d.parent.parent.name for d in ours} >= {"memory", "pids"}, ours
    memory = next(d for d in ours if d.parent.parent.name == "memory")
    assert str(idle["pid"]) in (memory / "cgroup.procs").read_text().split()
    assert cgroup_dirs(f"zlayer/{cid}") == []
    # Stats are read there: the limits are the spec's, its process is counted.
    stats = agent_stats(node.paths, cid)
    assert stats.memory_limit_bytes == 32 * 1024 * 1024 and stats.pids_limit == 16
    assert stats.pids >= 1 and stats.memory_bytes > 0
    # So is an OOM kill.
    hog = wait_until(
        lambda: next(
            (
                r
                for r in node.replicas("cgparent")
                if r["service"] == "hog" and r["exit_code"] is not None
            ),
            None,
        ),
        60,
        "the hog to be killed",
    )
    assert hog["exit_code"] == 137 and hog["oom_killed"] is True

    node.ctl("down", "cgparent", check=True)
    # Nothing of the parent is left, in any hierarchy.
    assert cgroup_dirs(PARENT) == []


def test_a_cgroup_parent_outside_a_relative_name_exits_78_with_one_sentence(
    zlayer_prefix: Paths, private_bus: PrivateBus
) -> None:
    zlayer_prefix.daemon_config("agentd").write_text('cgroup_parent = "../escape"\n')
    process = start("agentd", private_bus, None)
    code, err = stop(process, signal_first=False)
    assert code == 78, err
    assert "agentd.toml" in err and "`cgroup_parent`" in err
    assert "is not a relative cgroup name" in err and "Traceback" not in err
    assert cgroup_dirs("escape") == []
