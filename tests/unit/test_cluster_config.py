"""A node's cluster.toml: written and read back whole, its etcd member's command
line, and ``python -m shared.cluster.etcd check|run`` on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from shared.cluster import config
from shared.cluster.config import ClusterConfig, EtcdMemberConfig
from shared.paths import PREFIX_ENV, Paths

MEMBER = EtcdMemberConfig(
    name="n1-abc123",
    data_dir="/var/lib/zlayer/etcd",
    client_urls=["https://10.0.0.11:2379", "https://127.0.0.1:2379"],
    advertise_client_urls=["https://10.0.0.11:2379"],
    peer_urls=["https://10.0.0.11:2380"],
    initial_cluster={"n0-fff000": "https://10.0.0.10:2380", "n1-abc123": "https://10.0.0.11:2380"},
    initial_state="existing",
)


def node(member: EtcdMemberConfig | None) -> ClusterConfig:
    return ClusterConfig(
        node_id="n1-abc123",
        name="n1",
        advertise="10.0.0.11",
        etcd_endpoints=["https://10.0.0.10:2379"],
        files="/var/lib/zlayer/cluster",
        labels={"zone": "a", "odd key": 'q"uote'},
        etcd=member,
    )


@pytest.mark.parametrize("member", [MEMBER, None])
def test_written_and_read_back_whole(tmp_path: Path, member: EtcdMemberConfig | None) -> None:
    paths = Paths(tmp_path)
    assert config.load(paths) is None  # no file: a lone node
    config.save(paths, node(member))
    assert config.load(paths) == node(member)
    assert (config.path_of(paths).stat().st_mode & 0o777) == 0o600


def test_the_member_runs_with_the_cluster_files_as_tls() -> None:
    member = config.member(node(MEMBER))
    assert member is not None and config.member(node(None)) is None
    argv = member.argv()
    assert argv[argv.index("--initial-cluster-state") + 1] == "existing"
    assert argv[argv.index("--initial-cluster") + 1] == (
        "n0-fff000=https://10.0.0.10:2380,n1-abc123=https://10.0.0.11:2380"
    )
    assert argv[argv.index("--cert-file") + 1] == "/var/lib/zlayer/cluster/node.crt"
    assert argv[argv.index("--peer-trusted-ca-file") + 1] == "/var/lib/zlayer/cluster/ca.crt"
    assert "--client-cert-auth" in argv and "--peer-client-cert-auth" in argv


def test_the_member_is_given_the_revocation_list_once_there_is_one(tmp_path: Path) -> None:
    files = tmp_path / "cluster"
    files.mkdir()
    with_files = msgspec.structs.replace(node(MEMBER), files=str(files))
    member = config.member(with_files)
    assert member is not None and "--client-crl-file" not in member.argv()

    (files / "crl.pem").write_text("-----BEGIN X509 CRL-----\n")
    member = config.member(with_files)
    assert member is not None
    argv = member.argv()
    assert argv[argv.index("--client-crl-file") + 1] == str(files / "crl.pem")
    assert argv[argv.index("--peer-crl-file") + 1] == str(files / "crl.pem")


def test_a_broken_file_is_one_sentence(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    config.path_of(paths).write_text('node_id = "x"\n')
    with pytest.raises(config.ClusterConfigError, match="not a cluster configuration"):
        config.load(paths)


def run_entry(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cluster.etcd", *args],
        env={PREFIX_ENV: str(prefix), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_says_whether_this_node_runs_a_member(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert run_entry(tmp_path, "check").returncode == 1  # lone
    config.save(paths, node(None))
    assert run_entry(tmp_path, "check").returncode == 1  # a client of etcd only
    done = run_entry(tmp_path, "run")
    assert done.returncode == 78 and "runs no etcd member" in done.stderr
    config.save(paths, node(MEMBER))
    assert run_entry(tmp_path, "check").returncode == 0
    assert run_entry(tmp_path, "nonsense").returncode == 2
