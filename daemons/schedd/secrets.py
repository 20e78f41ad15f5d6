"""Secrets: values kept sealed in schedd's store, opened only to build a replica's env.

A value is sealed with AES-256-GCM under the node's secrets key
(:meth:`shared.nodekey.NodeKey.secrets_key`), a fresh 96-bit nonce per write,
and the secret's name and deployment as associated data: a row copied to
another name or deployment (by someone who can write the database but has not
the key) fails to open instead of handing one service another's secret.

A service's ``$S:NAME`` reads its deployment's secret NAME first, then the
node-wide one. Nothing here logs or raises with a value in it: errors name
the secret, never what it holds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from daemons.schedd.store import DesiredStore, Secret
from shared.bus import InvalidArgumentError, NotFoundError
from shared.wire.api import SecretInfo

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from shared.spec import DeploymentSpec

# As the spec reads a name after `$S:` (shared.spec.models._SECRET_NAME), bounded.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_VALUE_BYTES = 64 * 1024
NONCE_BYTES = 12


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


class Secrets:
    """The store's secrets, sealed and opened with the key ``load_key`` gives (read at
    first use: cryptography and the key file are not touched at schedd's start)."""

    def __init__(self, store: DesiredStore, load_key: Callable[[], bytes]) -> None:
        self.store = store
        self._load_key = load_key
        self._key: bytes | None = None

    def _aead(self) -> AESGCM:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if self._key is None:
            self._key = self._load_key()
        return AESGCM(self._key)

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
        aead = self._aead()
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, data, _associated(name, deployment))
        return self.store.put_secret(name, deployment, nonce, sealed)

    def open(self, secret: Secret) -> str:
        from cryptography.exceptions import InvalidTag

        aead = self._aead()
        try:
            data = aead.decrypt(
                secret.nonce, secret.ciphertext, _associated(secret.name, secret.deployment)
            )
        except InvalidTag:
            raise SecretUnreadableError(
                f"the {where(secret.name, secret.deployment)} does not open with this node's "
                "key (the key changed, or the row was altered); set it again with "
                "`zlayerctl secret set`"
            ) from None
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
