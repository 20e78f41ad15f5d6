"""The cluster's secrets key on disk and on the wire: made once at init (0600 in a 0700
directory), read back as written, refused with a sentence when missing, short or garbled;
and the key id each sealed value carries."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from daemons.schedd.secrets import CLUSTER_KEY, NODE_KEY, Secrets, SecretUnreadableError
from daemons.schedd.store import Store
from shared.cluster import secretkey
from shared.cluster.pki import ClusterFiles
from shared.cluster.secretkey import SecretsKeyError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_a_key_once_private_and_durable(tmp_path: Path) -> None:
    files = ClusterFiles(tmp_path / "cluster")
    assert secretkey.read(files) is None
    key = secretkey.make(files)
    assert len(key) == secretkey.KEY_BYTES
    assert files.secrets_key.read_bytes() == key
    assert (_mode(files.secrets_key), _mode(files.directory)) == (0o600, 0o700)
    assert secretkey.read(files) == secretkey.load(files) == key
    assert [p.name for p in files.directory.iterdir()] == ["secrets.key"]  # no temporary left
    with pytest.raises(SecretsKeyError, match=r"^this node already has a cluster secrets key"):
        secretkey.make(files)
    assert secretkey.load(files) == key  # kept
    assert secretkey.make(ClusterFiles(tmp_path / "other")) != key


def test_a_node_without_the_key_is_told_to_join_again(tmp_path: Path) -> None:
    files = ClusterFiles(tmp_path / "cluster")
    with pytest.raises(SecretsKeyError) as caught:
        secretkey.load(files)
    assert str(caught.value) == "this node does not have the cluster's secrets key: join it again"
    files.directory.mkdir()
    files.secrets_key.write_bytes(b"short")
    with pytest.raises(SecretsKeyError, match=r"is 5 bytes, not 32; join this node"):
        secretkey.load(files)


def test_the_key_crosses_the_wire_whole_and_a_garbled_one_is_refused() -> None:
    key = bytes(range(32))
    assert secretkey.from_wire(secretkey.to_wire(key)) == key
    assert secretkey.from_wire("") is None  # a node that has none sends none
    with pytest.raises(SecretsKeyError, match="is not base64"):
        secretkey.from_wire("not base64!")
    with pytest.raises(SecretsKeyError, match="in the join's answer is 3 bytes, not 32"):
        secretkey.from_wire("AAAA")
    with pytest.raises(SecretsKeyError):
        secretkey.to_wire(b"\0" * 31)


def test_a_value_opens_only_with_the_key_its_id_names(tmp_path: Path) -> None:
    """The key id a stored value carries picks the key; switched to another id, or one
    this version does not know, the value does not open (a sentence, never garbage)."""
    files = ClusterFiles(tmp_path / "cluster")
    secretkey.make(files)
    node_key = os.urandom(32)
    store = Store(tmp_path / "state.db")
    try:
        secrets = Secrets(store, lambda: node_key, lambda: secretkey.load(files))
        sealed = secrets.set("db-password", "", "hunter2")
        assert sealed.nonce[0] == CLUSTER_KEY and len(sealed.nonce) == 13
        assert secrets.open(sealed) == "hunter2"
        as_node = dataclasses.replace(sealed, nonce=bytes([NODE_KEY]) + sealed.nonce[1:])
        with pytest.raises(SecretUnreadableError, match="does not open with this node's key"):
            secrets.open(as_node)
        unknown = dataclasses.replace(sealed, nonce=b"\x07" + sealed.nonce[1:])
        with pytest.raises(SecretUnreadableError, match="with a key this version of ZLayer"):
            secrets.open(unknown)
        # a lone node seals with its own key, and a node key's value still opens in a cluster
        alone = Secrets(store, lambda: node_key).set("token", "", "t0k3n")
        assert alone.nonce[0] == NODE_KEY
        assert secrets.open(alone) == "t0k3n"
    finally:
        store.close()
