"""X25519 key pairs as WireGuard writes them: 32 raw bytes, base64 (44 characters).

The userspace protocol carries the same bytes in hex; :func:`to_hex` and
:func:`from_hex` convert.
"""

from __future__ import annotations

import base64
import binascii
import os

KEY_BYTES = 32


class InvalidKeyError(ValueError):
    """A key that is not a WireGuard key, in one sentence."""


def _raw(key: str) -> bytes:
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError("a WireGuard key is 32 bytes in base64 (44 characters)") from None
    if len(raw) != KEY_BYTES:
        raise InvalidKeyError("a WireGuard key is 32 bytes in base64 (44 characters)")
    return raw


def check(key: str) -> str:
    """The key, normalised, or InvalidKeyError with the sentence saying why it is none."""
    return base64.b64encode(_raw(key)).decode()


def generate_private() -> str:
    """A new private key, clamped as ``wg genkey`` clamps it."""
    raw = bytearray(os.urandom(KEY_BYTES))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return base64.b64encode(bytes(raw)).decode()


def public_of(private: str) -> str:
    """The public key of a private key (``wg pubkey``)."""
    # Loaded here: overlayd without the mesh on does not carry cryptography (~8 MB).
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = X25519PrivateKey.from_private_bytes(_raw(private))
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def to_hex(key: str) -> str:
    return _raw(key).hex()


def from_hex(text: str) -> str:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidKeyError("a key in the userspace protocol is 64 hex digits") from None
    if len(raw) != KEY_BYTES:
        raise InvalidKeyError("a key in the userspace protocol is 64 hex digits")
    return base64.b64encode(raw).decode()
