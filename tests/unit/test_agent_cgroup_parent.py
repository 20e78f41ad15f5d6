"""agentd's ``cgroup_parent`` setting: what it accepts, and the cgroups path and clean-up
of a replica whose spec names no parent of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemons.agentd import cgroups
from daemons.agentd.settings import AgentSettings
from shared.config import ConfigError
from shared.paths import Paths


def _load(tmp_path: Path, text: str) -> AgentSettings:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    paths.daemon_config("agentd").write_text(text)
    return AgentSettings.load("agentd", paths)


def test_the_default_parent_is_zlayer_and_the_paths_are_as_before(tmp_path: Path) -> None:
    assert _load(tmp_path, "").cgroup_parent == "zlayer"
    assert cgroups.cgroups_path("web-1", "cgroupfs") == "/zlayer/web-1"
    assert cgroups.cgroups_path("web-1", "systemd") == "zlayer.slice:zlayer:web-1"


def test_a_parent_from_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _load(tmp_path, 'cgroup_parent = "zlayer-x"\n').cgroup_parent == "zlayer-x"
    monkeypatch.setenv("ZLAYER_AGENTD_CGROUP_PARENT", "ops/zlayer")
    assert _load(tmp_path, 'cgroup_parent = "zlayer-x"\n').cgroup_parent == "ops/zlayer"


@pytest.mark.parametrize(
    "value", ["", "/zlayer", "../escape", "zlayer/..", "a//b", ".", "-x", "x-", "a--b", "a:b"]
)
def test_a_parent_that_is_not_a_relative_cgroup_name_is_one_sentence(
    tmp_path: Path, value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f'cgroup_parent = "{value}"\n')
    message = str(info.value)
    assert "`cgroup_parent`" in message and "is not a relative cgroup name" in message
    assert "ZLAYER_AGENTD_CGROUP_PARENT" in message and "\n" not in message


def test_the_node_parent_holds_replicas_whose_spec_names_none() -> None:
    path = cgroups.cgroups_path("web-1", "cgroupfs", node_parent="zlayer-x")
    assert path == "/zlayer-x/web-1"
    assert cgroups.relative_dir(path, "cgroupfs") == "zlayer-x/web-1"
    # The spec's own parent wins.
    assert cgroups.cgroups_path("web-1", "cgroupfs", "/batch", node_parent="zlayer-x") == (
        "/batch/web-1"
    )
    # systemd: a slice of that name, and scopes named after it (a scope's name is
    # the machine's, so two parents must not both make zlayer-web-1.scope).
    path = cgroups.cgroups_path("web-1", "systemd", node_parent="ops/zlayer-x")
    assert path == "ops-zlayer-x.slice:ops-zlayer-x:web-1"
    assert cgroups.relative_dir(path, "systemd") == (
        "ops.slice/ops-zlayer.slice/ops-zlayer-x.slice/ops-zlayer-x-web-1.scope"
    )


def test_only_the_node_parent_is_removed_once_empty(tmp_path: Path) -> None:
    layout = cgroups.CgroupLayout("v1", {n: tmp_path / n for n in ("memory", "pids")})
    for hierarchy in ("memory", "pids"):
        (tmp_path / hierarchy / "zlayer" / "other-node-replica").mkdir(parents=True)
        (tmp_path / hierarchy / "zlayer-x").mkdir()
    (tmp_path / "pids" / "zlayer-x" / "still-running").mkdir()
    cgroups.remove_empty_parents(layout, "cgroupfs", "zlayer-x")
    assert not (tmp_path / "memory" / "zlayer-x").exists()
    assert (tmp_path / "pids" / "zlayer-x" / "still-running").is_dir()
    assert (tmp_path / "memory" / "zlayer" / "other-node-replica").is_dir()


@pytest.mark.parametrize(
    ("mode", "self_cgroup", "expected"),
    [
        (
            "v2",
            "0::/system.slice/zlayer-agentd.service\n",
            "unified/system.slice/zlayer-agentd.service",
        ),
        (
            "v1",
            "3:pids:/system.slice/zlayer-agentd.service\n1:name=systemd:/system.slice/x\n",
            "pids/system.slice/zlayer-agentd.service",
        ),
        (
            "hybrid",
            "4:memory:/m\n1:name=systemd:/s\n0::/system.slice/zlayer-agentd.service\n",
            "unified/system.slice/zlayer-agentd.service",
        ),
        ("v1", "1:name=systemd:/s\n", None),
    ],
)
def test_the_move_warmer_moves_agentd_into_its_own_cgroup(
    tmp_path: Path, mode: str, self_cgroup: str, expected: str | None
) -> None:
    """Its own cgroup's procs file, in the unified hierarchy where there is one, never in
    systemd's named hierarchy (the kernel's lock is the same for all)."""
    v1 = {} if mode == "v2" else {n: tmp_path / n for n in ("memory", "pids", "name=systemd")}
    unified = None if mode == "v1" else tmp_path / "unified"
    layout = cgroups.CgroupLayout(mode, v1, unified)  # type: ignore[arg-type]
    (tmp_path / "self-cgroup").write_text(self_cgroup)
    found = cgroups.own_procs_file(layout, tmp_path / "self-cgroup")
    assert found == (None if expected is None else tmp_path / expected / "cgroup.procs")
