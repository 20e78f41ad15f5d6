"""The node key: made once (0600) or taken from the systemd credential; one sentence if unusable."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.nodekey import (
    CREDENTIAL_NAME,
    CREDENTIALS_ENV,
    KEY_BYTES,
    NO_CREDENTIAL,
    NodeKey,
    NodeKeyError,
    key_path,
)
from shared.paths import Paths


def test_made_once_0600_and_read_back(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    first = NodeKey.load(paths, environ={})
    assert len(first.material) == KEY_BYTES
    assert stat.S_IMODE(os.stat(key_path(paths)).st_mode) == 0o600
    assert NodeKey.load(paths, environ={}) == first
    # nothing but the key is left beside it
    assert [p.name for p in key_path(paths).parent.iterdir()] == [key_path(paths).name]


def test_daemons_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: NodeKey.load(paths, environ={}).material, range(16)))
    assert len(keys) == 1


def test_the_credential_wins_and_an_empty_one_means_the_file(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    env = {CREDENTIALS_ENV: str(credentials)}
    (credentials / CREDENTIAL_NAME).write_bytes(b"c" * KEY_BYTES)
    assert NodeKey.load(paths, environ=env).material == b"c" * KEY_BYTES
    assert not key_path(paths).exists()
    # the units' SetCredential= fallback, when the package made no encrypted credential
    (credentials / CREDENTIAL_NAME).write_bytes(NO_CREDENTIAL)
    from_file = NodeKey.load(paths, environ=env)
    assert from_file.material == key_path(paths).read_bytes()
    (credentials / CREDENTIAL_NAME).unlink()
    assert NodeKey.load(paths, environ=env) == from_file


def test_a_key_of_the_wrong_size_is_one_sentence(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    key_path(paths).parent.mkdir(parents=True)
    key_path(paths).write_bytes(b"short")
    with pytest.raises(NodeKeyError) as info:
        NodeKey.load(paths, environ={})
    assert str(info.value) == (
        f"the node key {key_path(paths)} is 5 bytes, not 32; restore it from a backup "
        "(secrets stored with the old key cannot be read without it)"
    )


def test_a_key_that_cannot_be_made_is_one_sentence(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    # the state directory's parent is a file: as root too, nothing can be made there
    (tmp_path / "var").write_text("not a directory")
    with pytest.raises(NodeKeyError, match=r"cannot read or make the node key .*reinstall"):
        NodeKey.load(paths, environ={})


def test_derived_keys_are_distinct_and_the_signing_key_verifies(tmp_path: Path) -> None:
    key = NodeKey(b"x" * KEY_BYTES)
    assert key.secrets_key() != key.derive(b"zlayer api token signing v1")
    assert key.secrets_key() == NodeKey(b"x" * KEY_BYTES).secrets_key()
    assert key.secrets_key() != NodeKey(b"y" * KEY_BYTES).secrets_key()
    signature = key.signing_key().sign(b"message")
    key.verifying_key().verify(signature, b"message")


def test_install_falls_back_to_the_file_and_keeps_a_key_it_finds(tmp_path: Path) -> None:
    from shared.nodekey import credential_path, install

    paths = Paths(tmp_path)
    said = install(paths, systemd_creds="/bin/false")  # systemd-creds that cannot encrypt here
    assert said.startswith(f"made the node key {key_path(paths)} (mode 0600")
    assert stat.S_IMODE(os.stat(key_path(paths)).st_mode) == 0o600
    made = key_path(paths).read_bytes()
    assert install(paths, systemd_creds="/bin/false") == f"keeping the node key {key_path(paths)}"
    assert key_path(paths).read_bytes() == made
    assert not credential_path(paths).exists()
    assert sorted(p.name for p in key_path(paths).parent.iterdir()) == ["node.key"]
