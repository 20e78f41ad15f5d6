"""The cluster's secrets key: the one key every node of a cluster seals and opens secrets with.

schedd seals a lone node's secrets with a key derived from the node key
(:meth:`shared.nodekey.NodeKey.secrets_key`), which no other node has; a
cluster keeps them in etcd, where every node must open them. So ``node init``
makes 32 random bytes (:func:`make`), kept as ``secrets.key`` beside the
cluster's certificates (:attr:`shared.cluster.pki.ClusterFiles.secrets_key`,
0600 in the 0700 directory, written whole: fsync, rename, fsync of the
directory). The node that answers joins hands it to each joining node in
Join's reply (:mod:`shared.cluster.peer`), over TLS the joining node pinned by
the token's CA fingerprint and only after the token's secret was checked; the
joining node writes it with its certificate (:func:`write`).

No cryptography here: schedd reads the key at the first secret it seals or
opens, and a lone schedd never imports the cluster's PKI.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import TYPE_CHECKING

from shared.statefile import write_atomically

if TYPE_CHECKING:
    from shared.cluster.pki import ClusterFiles

KEY_BYTES = 32
FILE_MODE = 0o600
DIR_MODE = 0o700
# What a node in a cluster without the key (lost, or joined before nodes handed
# it over) is told: only a join hands it over.
MISSING = "this node does not have the cluster's secrets key: join it again"


class SecretsKeyError(RuntimeError):
    """The cluster's secrets key is missing or cannot be used, in one sentence."""


def _checked(key: bytes, where: str) -> bytes:
    if len(key) != KEY_BYTES:
        raise SecretsKeyError(
            f"the cluster's secrets key {where} is {len(key)} bytes, not {KEY_BYTES}; "
            "join this node to the cluster again"
        )
    return key


def write(files: ClusterFiles, key: bytes) -> None:
    """Blocking: keep ``key`` as the node's ``secrets.key`` (0600, written whole)."""
    _checked(key, "to write")
    files.directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    write_atomically(files.secrets_key, key, FILE_MODE)


def make(files: ClusterFiles) -> bytes:
    """Blocking, ``node init``: a new key, written; refused if the node has one (a second
    would leave every secret the cluster sealed unreadable)."""
    if files.secrets_key.exists():
        raise SecretsKeyError(
            f"this node already has a cluster secrets key ({files.secrets_key}); "
            "it is in a cluster: leave it (node rm) before making a new one"
        )
    key = secrets.token_bytes(KEY_BYTES)
    write(files, key)
    return key


def read(files: ClusterFiles) -> bytes | None:
    """Blocking: the key, or None when this node has none."""
    path = files.secrets_key
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecretsKeyError(
            f"cannot read the cluster's secrets key {path} ({exc.strerror}); run as root"
        ) from None
    return _checked(key, str(path))


def load(files: ClusterFiles) -> bytes:
    """Blocking: the key of a node in a cluster; :data:`MISSING` when it has none."""
    key = read(files)
    if key is None:
        raise SecretsKeyError(MISSING)
    return key


def to_wire(key: bytes) -> str:
    """The key as Join's reply carries it (base64)."""
    return base64.b64encode(_checked(key, "to send")).decode()


def from_wire(text: str) -> bytes | None:
    """The key in a Join reply; None when the answering node sent none."""
    if not text:
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecretsKeyError(
            "the cluster's secrets key in the join's answer is not base64; "
            "check that both nodes run the same ZLayer version"
        ) from None
    return _checked(key, "in the join's answer")
