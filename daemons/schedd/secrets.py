"""Secrets: values kept sealed in schedd's store, opened only to build a replica's env.

A value is sealed with AES-256-GCM, a fresh 96-bit nonce per write, and the
secret's name and deployment as associated data: a row copied to another name
or deployment (by someone who can write the database but has not the key)
fails to open instead of handing one service another's secret.

The key is the node's secrets key (:meth:`shared.nodekey.NodeKey.secrets_key`)
on a lone node, and the cluster's secrets key (:mod:`shared.cluster.secretkey`),
which every node of the cluster holds, in a cluster. A stored value says which
key sealed it: its stored nonce is the key's id (:data:`NODE_KEY`,
:data:`CLUSTER_KEY`) then the 12-byte nonce; a bare 12-byte nonce is a value
sealed before ids, with the node key. So each value opens with the key that
sealed it, and :func:`reseal` moves a lone node's values to the cluster's key
when it makes a cluster (``node init``).

A service's ``$S:NAME`` reads its deployment's secret NAME first, then the
node-wide one. Nothing here logs or raises with a value in it: errors name
the secret, never what it holds.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from daemons.schedd.store import DesiredStore, Secret
from shared.bus import InvalidArgumentError, NotFoundError, UnavailableError
from shared.cluster.secretkey import MISSING, SecretsKeyError
from shared.wire.api import SecretInfo

if TYPE_CHECKING:
    from daemons.schedd.etcdstore import EtcdStore
    from shared.spec import DeploymentSpec

# As the spec reads a name after `$S:` (shared.spec.models._SECRET_NAME), bounded.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_VALUE_BYTES = 64 * 1024
NONCE_BYTES = 12
# Which key sealed a value: the first byte of its stored nonce.
NODE_KEY = 1  # this node's own (shared.nodekey): a lone node's secrets
CLUSTER_KEY = 2  # the cluster's (shared.cluster.secretkey): every node of it opens them


class SecretUnreadableError(RuntimeError):
    """A stored secret that does not open with this node's key, in one sentence."""


def check_name(name: str, deployment: str) -> None:
    if not NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"{name!r} is not a secret name: use letters, digits, '.', '_' and '-', starting "
            "with a letter or digit, at most 253 characters"
        )
    if deployment and not DEPLOYMENT.fullmatch(deployment):
        raise InvalidArgumentError(f"{deployment!r} is not a deployment name")


def info(secret: Secret) -> SecretInfo:
    return SecretInfo(
        name=secret.name,
        deployment=secret.deployment,
        created_at=secret.created_at,
        updated_at=secret.updated_at,
        version=secret.version,
    )


def _associated(name: str, deployment: str) -> bytes:
    return f"{name}\0{deployment}".encode()


def where(name: str, deployment: str) -> str:
    return f"secret {name} of deployment {deployment}" if deployment else f"node-wide secret {name}"


@dataclass(frozen=True)
class SealingKey:
    """A key values are sealed with, and the id stored with each value it seals."""

    id: int
    material: bytes = field(repr=False)

    @classmethod
    def node(cls, material: bytes) -> SealingKey:
        return cls(NODE_KEY, material)

    @classmethod
    def cluster(cls, material: bytes) -> SealingKey:
        return cls(CLUSTER_KEY, material)


def sealed_by(secret: Secret) -> tuple[int, bytes]:
    """(the id of the key that sealed ``secret``, its AES-GCM nonce); id 0: not a value
    this version seals."""
    if len(secret.nonce) == NONCE_BYTES:  # sealed before key ids: with the node key
        return NODE_KEY, secret.nonce
    if len(secret.nonce) == NONCE_BYTES + 1:
        return secret.nonce[0], secret.nonce[1:]
    return 0, b""


def _seal(key: SealingKey, name: str, deployment: str, data: bytes) -> tuple[bytes, bytes]:
    """(stored nonce, ciphertext) of ``data`` sealed with ``key``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key.material).encrypt(nonce, data, _associated(name, deployment))
    return bytes([key.id]) + nonce, sealed


def _unseal(key: bytes, nonce: bytes, secret: Secret) -> bytes | None:
    """The plain bytes of ``secret``; None when it does not open with ``key``."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(
            nonce, secret.ciphertext, _associated(secret.name, secret.deployment)
        )
    except InvalidTag:
        return None


class Secrets:
    """The store's secrets, sealed and opened with the keys ``load_key`` (the node's) and
    ``cluster_key`` (the cluster's, in a cluster: it raises
    :class:`~shared.cluster.secretkey.SecretsKeyError` when this node has none) give,
    read at first use: cryptography and the key files are not touched at schedd's start.

    New values are sealed with the cluster's key when ``cluster_key`` is given, else
    with the node's; each value opens with the key that sealed it.
    """

    def __init__(
        self,
        store: DesiredStore,
        load_key: Callable[[], bytes],
        cluster_key: Callable[[], bytes] | None = None,
    ) -> None:
        self.store = store
        self._load_key = load_key
        self._load_cluster_key = cluster_key
        self._keys: dict[int, bytes] = {}

    def _key(self, key_id: int) -> bytes:
        """The key of ``key_id`` (NODE_KEY or CLUSTER_KEY); SecretsKeyError (a sentence)
        when this node has none."""
        found = self._keys.get(key_id)
        if found is None:
            if key_id == NODE_KEY:
                found = self._load_key()
            elif self._load_cluster_key is not None:
                found = self._load_cluster_key()
            else:
                raise SecretsKeyError(MISSING)
            self._keys[key_id] = found
        return found

    def _sealing(self) -> SealingKey:
        key_id = CLUSTER_KEY if self._load_cluster_key is not None else NODE_KEY
        try:
            return SealingKey(key_id, self._key(key_id))
        except SecretsKeyError as exc:
            raise UnavailableError(str(exc)) from None

    def set(self, name: str, deployment: str, value: str) -> Secret:
        """Seal and store ``value``; the stored row (without the value)."""
        check_name(name, deployment)
        data = value.encode("utf-8", "surrogatepass")
        if "$S:" in value or "$E:" in value:
            # agentd reads a replica's env as spec text: it would take these for
            # references (and refuse or drop the value), so they cannot pass.
            raise InvalidArgumentError(
                f"the value of secret {name} contains `$S:` or `$E:`, which a service's env "
                "would read as a reference; encode the value (base64, say) before setting it"
            )
        if len(data) > MAX_VALUE_BYTES:
            raise InvalidArgumentError(
                f"the value of secret {name} is {len(data)} bytes, more than the "
                f"{MAX_VALUE_BYTES // 1024} KiB a secret may hold"
            )
        nonce, sealed = _seal(self._sealing(), name, deployment, data)
        return self.store.put_secret(name, deployment, nonce, sealed)

    def open(self, secret: Secret) -> str:
        key_id, nonce = sealed_by(secret)
        if key_id not in (NODE_KEY, CLUSTER_KEY):
            raise SecretUnreadableError(
                f"the {where(secret.name, secret.deployment)} was sealed with a key this "
                "version of ZLayer does not know; set it again with `zlayerctl secret set`"
            )
        try:
            key = self._key(key_id)
        except SecretsKeyError as exc:  # the key's fault, not the value's: its own sentence
            raise SecretUnreadableError(str(exc)) from None
        data = _unseal(key, nonce, secret)
        if data is None:
            whose = "the cluster's secrets key" if key_id == CLUSTER_KEY else "this node's key"
            raise SecretUnreadableError(
                f"the {where(secret.name, secret.deployment)} does not open with {whose} "
                "(the key changed, or the row was altered); set it again with "
                "`zlayerctl secret set`"
            )
        return data.decode("utf-8", "surrogatepass")

    def require(self, name: str, deployment: str) -> Secret:
        check_name(name, deployment)
        found = self.store.secret(name, deployment)
        if found is None:
            raise NotFoundError(
                f"there is no {where(name, deployment)}; `zlayerctl secret ls` lists them"
            )
        return found

    def find(self, name: str, deployment: str) -> Secret | None:
        """What ``$S:name`` in ``deployment`` reads: its own secret, else the node-wide one."""
        return self.store.secret(name, deployment) or (
            self.store.secret(name, "") if deployment else None
        )

    def lookup(self, deployment: str) -> Callable[[str], str | None]:
        """``name -> value`` for a service of ``deployment`` (None: not set)."""

        def value(name: str) -> str | None:
            found = self.find(name, deployment)
            return None if found is None else self.open(found)

        return value


class Resealed(NamedTuple):
    """What :func:`reseal` did: how many values it sealed again with the new key, and the
    secrets it left as they were (they do not open with the old key: unreadable before)."""

    resealed: int
    left: list[str]


RESEAL_PASSES = 10  # a value changed under reseal is read again; bounded


def reseal(store: EtcdStore, old: SealingKey, new: SealingKey) -> Resealed:
    """Blocking: seal again with ``new`` every value of ``store`` that ``old`` sealed,
    each keeping its version and times (a service reading it does not roll for this).

    ``node init`` calls it once the lone node's state is in etcd
    (:func:`~daemons.schedd.etcdstore.move_to_etcd`), from the node's key to the
    cluster's, before any other node can read the store. Each write is guarded by the
    value's revision, so a secret set meanwhile is kept (and sealed with ``new``
    already); values ``new`` sealed are left, so a reseal cut short can run again.
    """
    from aetcd import transactions as tx  # type: ignore[import-untyped]

    from daemons.schedd.etcdstore import _secret, _secret_value

    prefix = store._key("secrets", "")

    async def held() -> list[Any]:
        _, kvs = await store._prefix(prefix)
        return kvs

    count = 0
    left: list[str] = []
    for _ in range(RESEAL_PASSES):
        changed_meanwhile = False
        left = []
        for kv in store._call(held):
            deployment, name = store._tail(kv, prefix)
            secret = _secret(name, deployment, kv.value)
            key_id, nonce = sealed_by(secret)
            if key_id != old.id:
                continue
            data = _unseal(old.material, nonce, secret)
            if data is None:
                left.append(where(name, deployment))
                continue
            stored_nonce, sealed = _seal(new, name, deployment, data)
            value = _secret_value(
                dataclasses.replace(secret, nonce=stored_nonce, ciphertext=sealed)
            )
            key, revision = bytes(kv.key), int(kv.mod_revision)
            if store._call(
                lambda k=key, r=revision, v=value: store._txn(  # type: ignore[misc]
                    [tx.Mod(k) == r], [tx.Put(k, v)]
                )
            ):
                count += 1
            else:
                changed_meanwhile = True
        if not changed_meanwhile:
            break
    return Resealed(count, left)


def spec_references(spec: DeploymentSpec) -> dict[str, set[str]]:
    """Service -> the secret names its env reads (services that read none are left out)."""
    from shared.spec.refs import secret_names

    found: dict[str, set[str]] = {}
    for svc_name, svc in spec.services.items():
        names = {n for value in svc.env.values() for n in secret_names(value)}
        if names:
            found[svc_name] = names
    return found


def missing(spec: DeploymentSpec, secrets: Secrets) -> list[str]:
    """One sentence per ``$S:`` reference of ``spec`` that nothing resolves (no value)."""
    from shared.spec.refs import UnresolvedReferenceError, resolve_secrets

    def known(name: str) -> str | None:
        return "" if secrets.find(name, spec.deployment) is not None else None

    problems = []
    for svc_name, svc in spec.services.items():
        for key, value in svc.env.items():
            try:
                resolve_secrets(value, known, f"services.{svc_name}.env.{key}")
            except UnresolvedReferenceError as exc:
                problems.append(str(exc))
    return problems
