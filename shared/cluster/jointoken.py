"""Join tokens: what ``zlayerctl node join-token`` prints and ``node join`` reads.

A token is one copyable line, ``zlj1.`` and base64url (unpadded) of a JSON
object: the address and port of the node to join through, a random secret
(32 bytes), the cluster CA's fingerprint (SHA-256 of its DER, hex) and an
expiry (Unix time). The joining node checks the CA it is shown against the
fingerprint before it sends the secret, so the token is all it needs to trust.

The cluster keeps only the SHA-256 of the secret, in a
:class:`~shared.wire.cluster.JoinTokenRecord` under ``KEYS["join_tokens"]``
keyed by that hash (:func:`record_key`): anyone who reads etcd cannot join
with what is stored. The secret is random, so one SHA-256 is enough; a slow
hash would only protect guessable passwords. A token can be used until it
expires, by as many nodes as need it; :func:`save` binds its record to an etcd
lease that ends with it, so etcd forgets it then.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import math
import re
import secrets
import time
from typing import Any

import msgspec

from shared.wire import Wire, WireError, decode, encode
from shared.wire.cluster import KEYS, JoinTokenRecord

VERSION_PREFIX = "zlj1."
SECRET_BYTES = 32
DEFAULT_TTL = 24 * 3600.0
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_TOKEN_SHAPE = re.compile(r"zlj[0-9]+\.")


class JoinTokenError(ValueError):
    """A token that cannot be used, in one sentence."""


class JoinToken(Wire, frozen=True, kw_only=True):
    """What a token carries."""

    address: str  # the node to join through, as this node reaches it
    port: int  # its port for joins
    secret: str  # base64url, unpadded, of SECRET_BYTES random bytes
    ca_sha256: str  # the cluster CA's fingerprint, lowercase hex
    expires_at: int  # Unix time

    def text(self) -> str:
        """The token as the user copies it."""
        return VERSION_PREFIX + _b64(encode(self).encode())

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def record_key(record: JoinTokenRecord) -> str:
    """Where the record lives in etcd."""
    return KEYS["join_tokens"] + record.secret_sha256


def key_for_secret(secret: str) -> str:
    """Where the record of a presented secret would be."""
    return KEYS["join_tokens"] + secret_sha256(secret)


def make(
    address: str,
    port: int,
    ca_fingerprint: str,
    ttl: float = DEFAULT_TTL,
    *,
    created_by: str = "",
    now: float | None = None,
) -> tuple[JoinToken, JoinTokenRecord]:
    """A new token and the record the cluster stores for it (the token is shown once)."""
    if not _FINGERPRINT.fullmatch(ca_fingerprint):
        raise ValueError(f"{ca_fingerprint!r} is not a SHA-256 fingerprint in lowercase hex")
    if not 0 < port < 65536:
        raise ValueError(f"{port} is not a port")
    if ttl <= 0:
        raise ValueError("a join token's lifetime must be positive")
    made = time.time() if now is None else now
    secret = _b64(secrets.token_bytes(SECRET_BYTES))
    token = JoinToken(
        address=address,
        port=port,
        secret=secret,
        ca_sha256=ca_fingerprint,
        expires_at=int(made + ttl),
    )
    record = JoinTokenRecord(
        secret_sha256=secret_sha256(secret),
        expires_at=float(token.expires_at),
        created_at=made,
        created_by=created_by,
    )
    return token, record


def _when(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_RENEW = "make a new one with zlayerctl node join-token on a node of the cluster"


def parse(text: str, now: float | None = None) -> JoinToken:
    """The token in ``text`` (whitespace a copy added is ignored); :class:`JoinTokenError`
    if it is not one, is damaged, or has expired."""
    compact = "".join(text.split())
    if not compact.startswith(VERSION_PREFIX):
        if _TOKEN_SHAPE.match(compact):
            raise JoinTokenError(
                f"the join token is of a version this ZLayer does not read "
                f"({compact.split('.', 1)[0]}); join with the same ZLayer version as the cluster"
            )
        raise JoinTokenError(
            f"this is not a join token (one starts with {VERSION_PREFIX}); copy the whole "
            "line zlayerctl node join-token printed"
        )
    body = compact[len(VERSION_PREFIX) :]
    try:
        raw = _unb64(body)
        token = decode(raw, JoinToken)
        secret = _unb64(token.secret)
    except (binascii.Error, ValueError, WireError, msgspec.DecodeError):
        raise JoinTokenError(
            "the join token is damaged (it does not decode); copy the whole line again"
        ) from None
    if (
        len(secret) != SECRET_BYTES
        or not _FINGERPRINT.fullmatch(token.ca_sha256)
        or not 0 < token.port < 65536
        or not token.address
    ):
        raise JoinTokenError(
            "the join token is damaged (a field is missing or out of range); "
            "copy the whole line again"
        )
    if token.expired(now):
        raise JoinTokenError(f"the join token expired at {_when(token.expires_at)}; {_RENEW}")
    return token


def check(secret: str, record: JoinTokenRecord | None, now: float | None = None) -> None:
    """The joining side's secret against the record found under :func:`key_for_secret`
    (None: nothing there); :class:`JoinTokenError` saying why it is refused."""
    if record is None or not hmac.compare_digest(record.secret_sha256, secret_sha256(secret)):
        raise JoinTokenError(
            f"the join token is not one this cluster made (or it was revoked); {_RENEW}"
        )
    if (time.time() if now is None else now) >= record.expires_at:
        raise JoinTokenError(f"the join token expired at {_when(record.expires_at)}; {_RENEW}")


async def save(client: Any, record: JoinTokenRecord, now: float | None = None) -> None:
    """Store ``record`` with an aetcd ``client``, under a lease that ends when the token
    does (rounded up to a second): an expired token leaves nothing behind."""
    ttl = math.ceil(record.expires_at - (time.time() if now is None else now))
    if ttl <= 0:
        raise ValueError("the join token has already expired; there is nothing to store")
    lease = await client.lease(ttl)
    await client.put(record_key(record).encode(), encode(record).encode(), lease=lease)


async def load(client: Any, secret_sha256_hex: str) -> JoinTokenRecord | None:
    """The record stored for a secret's hash, if any (one that does not decode is none)."""
    found = await client.get((KEYS["join_tokens"] + secret_sha256_hex).encode())
    if found is None:
        return None
    try:
        return decode(found.value, JoinTokenRecord)
    except WireError:
        return None
