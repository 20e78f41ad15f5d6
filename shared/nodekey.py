"""The node key: one secret per node, from which the API's signing key and the
key that encrypts secrets at rest are derived.

The key is 32 random bytes. The package makes it at install: encrypted with
``systemd-creds`` as ``/var/lib/zlayer/node-key.cred`` where the host can,
which the units of apid and schedd load as the credential ``node-key``
(``LoadCredentialEncrypted=``), so the key is in clear only in those
services' memory; else the file ``/var/lib/zlayer/node.key`` (mode 0600).
Without systemd (``zlayerctl daemon run``) whichever daemon starts first
makes that file. A credential that cannot be decrypted (the TPM or the
host's credential secret changed) stops the unit before the daemon runs:
systemd says so in the journal, and the daemon never falls back to another
key, which would make every token and secret unreadable. Each use derives its own key with
HKDF-SHA256 and a distinct label, so a token signature can never be turned
into a secret's key or the other way round.

cryptography is imported on first use, not at import time: only apid and
schedd ever need it, and only once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.paths import Paths

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

KEY_BYTES = 32
CREDENTIAL_NAME = "node-key"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
FILE_NAME = "node.key"
# the units' SetCredential= fallback when the package made no encrypted credential
NO_CREDENTIAL = b"none"

_SIGNING_LABEL = b"zlayer api token signing v1"
_SECRETS_LABEL = b"zlayer secrets at rest v1"


class NodeKeyError(RuntimeError):
    """The node key exists but cannot be used, in one sentence."""


def key_path(paths: Paths) -> Path:
    return paths.state_dir / FILE_NAME


@dataclass(frozen=True)
class NodeKey:
    """The node's secret and the keys derived from it."""

    material: bytes

    @classmethod
    def load(cls, paths: Paths, environ: dict[str, str] | None = None) -> NodeKey:
        """The systemd credential if the service has one, else the key file (made if missing)."""
        env = os.environ if environ is None else environ
        credentials = env.get(CREDENTIALS_ENV)
        if credentials:
            credential = Path(credentials) / CREDENTIAL_NAME
            try:
                material = credential.read_bytes()
            except FileNotFoundError:
                material = b""
            except OSError as exc:
                raise NodeKeyError(
                    f"cannot read the node key credential {credential} ({exc.strerror}); "
                    "check the service's LoadCredentialEncrypted= line"
                ) from None
            # the units' fallback (the host could not encrypt one): use the file
            if material not in (b"", NO_CREDENTIAL):
                return cls(_checked(material, credential))
        path = key_path(paths)
        try:
            material = _read_or_create(path)
        except OSError as exc:
            raise NodeKeyError(
                f"cannot read or make the node key {path} ({exc.strerror}); "
                "reinstall the package (it makes the key) or run the daemon as root"
            ) from None
        return cls(_checked(material, path))

    def derive(self, label: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(
            self.material
        )

    def signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 key apid signs API tokens with."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.derive(_SIGNING_LABEL))

    def verifying_key(self) -> Ed25519PublicKey:
        return self.signing_key().public_key()

    def secrets_key(self) -> bytes:
        """The AES-256-GCM key schedd encrypts secrets at rest with."""
        return self.derive(_SECRETS_LABEL)


def _checked(material: bytes, where: Path) -> bytes:
    if len(material) != KEY_BYTES:
        raise NodeKeyError(
            f"the node key {where} is {len(material)} bytes, not {KEY_BYTES}; "
            "restore it from a backup (secrets stored with the old key cannot be read without it)"
        )
    return material


def _read_or_create(path: Path) -> bytes:
    """Read the key file; make it (0600, written whole, then linked in place) if absent.

    Two daemons starting at once both try: the link is atomic and only one
    wins, the other reads the winner's key.
    """
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(secrets.token_bytes(KEY_BYTES))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_bytes()


def credential_path(paths: Paths) -> Path:
    """``/var/lib/zlayer/node-key.cred``: the key encrypted by systemd-creds (the units load it)."""
    return paths.state_dir / (CREDENTIAL_NAME + ".cred")


def install(paths: Paths, systemd_creds: str | None = None) -> str:
    """Make the node key at package install, once; a sentence saying what was done.

    Encrypted with ``systemd-creds`` (TPM2 and/or the host's credential
    secret) as :func:`credential_path` when that works here; else the 0600
    file :func:`key_path`. A key already made, either way, is kept: a new one
    would make every token and secret unreadable.
    """
    import shutil
    import subprocess

    encrypted, plain = credential_path(paths), key_path(paths)
    if encrypted.exists():
        return f"keeping the node key credential {encrypted}"
    if plain.exists():
        return f"keeping the node key {plain}"
    encrypted.parent.mkdir(parents=True, exist_ok=True)
    tool = systemd_creds or shutil.which("systemd-creds")
    if tool is not None:
        temporary = encrypted.with_name(f".{encrypted.name}.{os.getpid()}")
        made = subprocess.run(
            [tool, "encrypt", f"--name={CREDENTIAL_NAME}", "-", str(temporary)],
            input=secrets.token_bytes(KEY_BYTES),
            capture_output=True,
            check=False,
        )
        if made.returncode == 0:
            os.chmod(temporary, 0o600)
            os.rename(temporary, encrypted)
            return f"made the node key, encrypted by systemd-creds, as {encrypted}"
        temporary.unlink(missing_ok=True)
    _read_or_create(plain)
    return f"made the node key {plain} (mode 0600; systemd-creds cannot encrypt here)"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m shared.nodekey install")
    print(install(Paths.from_env()))
