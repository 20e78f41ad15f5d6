"""schedd's [cluster] section: which store keeps the desired state."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemons.schedd.backend import SchedSettings, open_store
from daemons.schedd.store import Store
from shared.config import ConfigError
from shared.paths import Paths
from tests.fresh_interpreter import modules_after


def settings(tmp_path: Path, text: str) -> SchedSettings:
    paths = Paths(tmp_path)
    paths.daemon_config("schedd").parent.mkdir(parents=True, exist_ok=True)
    paths.daemon_config("schedd").write_text(text)
    return SchedSettings.load("schedd", paths)


def test_no_cluster_section_is_a_lone_node_on_sqlite(tmp_path: Path) -> None:
    store = open_store(settings(tmp_path, "").cluster, tmp_path / "state.db")
    try:
        assert isinstance(store, Store) and (tmp_path / "state.db").exists()
    finally:
        store.close()


def test_etcd_endpoints_put_the_state_in_etcd(tmp_path: Path) -> None:
    from daemons.schedd.etcdstore import EtcdStore

    for name in ("ca.pem", "node.pem", "node.key"):
        (tmp_path / name).write_text("")
    text = (
        "[cluster]\n"
        'etcd_endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]\n'
        f'ca_file = "{tmp_path / "ca.pem"}"\n'
        f'cert_file = "{tmp_path / "node.pem"}"\n'
        f'key_file = "{tmp_path / "node.key"}"\n'
        "timeout = 3\n"
    )
    store = open_store(settings(tmp_path, text).cluster, tmp_path / "state.db")
    try:
        assert isinstance(store, EtcdStore)
        assert store.endpoints == ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        assert store.timeout == 3
        assert not (tmp_path / "state.db").exists()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[cluster]\netcd_endpoints = ["http://a:2379"]\nca_file = "ca.pem"\n', "together"),
        ('[cluster]\nca_file = "a"\ncert_file = "b"\nkey_file = "c"\n', "no etcd_endpoints"),
        ('[cluster]\netcd_endpoint = "http://a:2379"\n', "unknown field `etcd_endpoint`"),
        ("[cluster]\ntimeout = 0\n", "timeout"),
    ],
)
def test_a_wrong_cluster_section_is_one_sentence(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings(tmp_path, text)
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_a_lone_node_does_not_import_the_etcd_client(tmp_path: Path) -> None:
    code = (
        "from pathlib import Path\n"
        "from daemons.schedd.backend import ClusterSettings, open_store\n"
        f"open_store(ClusterSettings(), Path({str(tmp_path / 'state.db')!r})).close()\n"
    )
    loaded = modules_after(code)
    assert "daemons.schedd.backend" in loaded
    assert not {"aetcd", "grpc", "cryptography", "daemons.schedd.etcdstore"} & loaded
