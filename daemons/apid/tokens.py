"""The API's token store: who holds a token, with which role and scope, and whether it is revoked.

The store keeps each token's name, role, deployments, creation and expiry
times, its ``jti`` and whether it is revoked, in one state file under apid's
state directory (0600). It never keeps the token text: the JWT is shown once,
when it is made, and a lost token is revoked and made anew.

The auth middleware reads the store in memory on every request
(:meth:`TokenStore.by_jti`), so a revocation holds from the next request on;
the file is written after the change, off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from aiohttp import web
from sdbus import dbus_method_async_override

from shared.bus import (
    AlreadyExistsError,
    Api1,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from shared.statefile import read_state, write_atomically
from shared.wire import WireError, decode, encode
from shared.wire.api import TokenCreate, TokenInfo, TokenIssued

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

STATE_FILE = "tokens.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
DEPLOYMENT_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# ten years: past that, a token that never expires (no --ttl) says what is meant
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600

RoleName = Literal["viewer", "operator", "admin"]


class StoredToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One token as the store keeps it: everything but the token text."""

    name: str
    role: RoleName
    deployments: list[str]
    created: float
    expires: float | None
    jti: str
    revoked: bool = False

    def info(self) -> TokenInfo:
        return TokenInfo(
            name=self.name,
            role=self.role,
            deployments=list(self.deployments),
            created_at=self.created,
            expires_at=self.expires,
            revoked=self.revoked,
        )


class TokenFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    version: int = 1
    tokens: list[StoredToken] = []


class TokenStore:
    """The tokens of this node, in memory and in ``path``."""

    def __init__(self, path: Path, signing_key: Callable[[], Ed25519PrivateKey]) -> None:
        self.path = path
        self._make_signing_key = signing_key
        self._by_name: dict[str, StoredToken] = {}
        self._by_jti: dict[str, StoredToken] = {}
        self._write_lock = asyncio.Lock()

    @functools.cached_property
    def signing_key(self) -> Ed25519PrivateKey:
        """Made with the first token made or checked: cryptography is not loaded before
        (an idle apid does without its 6 MiB)."""
        return self._make_signing_key()

    @classmethod
    def open(cls, state_dir: Path, signing_key: Callable[[], Ed25519PrivateKey]) -> TokenStore:
        """The store of ``state_dir`` as last written (empty if none, or if unusable)."""
        store = cls(state_dir / STATE_FILE, signing_key)
        saved = read_state(
            store.path,
            _parse,
            then="starting with no tokens (every token made before is refused; make new ones)",
        )
        for token in saved.tokens if saved else []:
            store._put(token)
        return store

    # ---------------------------------------------------------------- reads

    def by_jti(self, jti: str) -> StoredToken | None:
        return self._by_jti.get(jti)

    def list(self) -> list[TokenInfo]:
        return [self._by_name[name].info() for name in sorted(self._by_name)]

    # ---------------------------------------------------------------- changes

    def issue(self, request: TokenCreate, now: float | None = None) -> TokenIssued:
        """A new token (its text, once) and its record; the record is kept in memory only.

        Call :meth:`save` after. A name in use by a token that is not revoked
        is refused; a revoked one's name may be used again.
        """
        import jwt

        _check(request)
        existing = self._by_name.get(request.name)
        if existing is not None and not existing.revoked:
            raise AlreadyExistsError(
                f"there is already a token named {request.name}; revoke it first "
                f"(zlayerctl token revoke {request.name}) or pick another name"
            )
        created = time.time() if now is None else now
        expires = None if request.ttl_seconds is None else created + request.ttl_seconds
        stored = StoredToken(
            name=request.name,
            role=request.role,
            deployments=sorted(set(request.deployments)),
            created=created,
            expires=expires,
            jti=secrets.token_urlsafe(18),
        )
        claims: dict[str, Any] = {
            "sub": stored.name,
            "role": stored.role,
            "iat": int(created),
            "jti": stored.jti,
        }
        if stored.deployments:
            claims["deployments"] = stored.deployments
        if expires is not None:
            claims["exp"] = int(expires)
        token = jwt.encode(claims, self.signing_key, algorithm="EdDSA")
        if existing is not None:
            self._by_jti.pop(existing.jti, None)
        self._put(stored)
        return TokenIssued(token=token, info=stored.info())

    def revoke(self, name: str) -> TokenInfo:
        """Revoke the token ``name`` (at once: the next request with it is refused)."""
        existing = self._by_name.get(name)
        if existing is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise NotFoundError(f"there is no token named {name} (tokens: {known})")
        revoked = msgspec.structs.replace(existing, revoked=True)
        self._put(revoked)
        return revoked.info()

    async def save(self) -> None:
        """Write the store as it is now, off the event loop; one writer at a time."""
        async with self._write_lock:
            text = encode(TokenFile(tokens=[self._by_name[n] for n in sorted(self._by_name)]))
            await asyncio.to_thread(write_atomically, self.path, text, 0o600)

    async def create(self, request: TokenCreate) -> TokenIssued:
        issued = self.issue(request)
        await self.save()
        return issued

    async def remove(self, name: str) -> TokenInfo:
        info = self.revoke(name)
        await self.save()
        return info

    def _put(self, token: StoredToken) -> None:
        self._by_name[token.name] = token
        self._by_jti[token.jti] = token


def _parse(text: str) -> TokenFile:
    try:
        return decode(text, TokenFile)
    except WireError as exc:
        raise ValueError(str(exc)) from exc


def _check(request: TokenCreate) -> None:
    if not NAME_PATTERN.fullmatch(request.name):
        raise InvalidArgumentError(
            f"{request.name!r} is not a token name; use letters, digits and . _ @ - "
            "(up to 64, starting with a letter or digit)"
        )
    for deployment in request.deployments:
        if not DEPLOYMENT_PATTERN.fullmatch(deployment):
            raise InvalidArgumentError(f"{deployment!r} is not a deployment name")
    if request.ttl_seconds is not None and not 0 < request.ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgumentError(
            f"a token's lifetime must be between 1 s and {MAX_TTL_SECONDS // 86400} days; "
            "leave --ttl out for a token that never expires"
        )


TOKEN_STORE_KEY = web.AppKey("token_store", TokenStore)


class TokenMethods(Api1):
    """Api1's token members (CreateToken, ListTokens, RevokeToken) over a TokenStore.

    apid's bus service derives from this and sets ``token_store`` once the
    store is open; until then the members answer Unavailable.
    """

    token_store: TokenStore | None = None

    def _store(self) -> TokenStore:
        if self.token_store is None:
            raise UnavailableError("zlayer-apid is starting; its tokens are not loaded yet")
        return self.token_store

    @dbus_method_async_override()
    async def create_token(self, request: str) -> str:
        try:
            wanted = decode(request, TokenCreate)
        except WireError as exc:
            raise InvalidArgumentError(f"the token request is {exc}") from None
        return encode(await self._store().create(wanted))

    @dbus_method_async_override()
    async def list_tokens(self) -> str:
        return encode(self._store().list())

    @dbus_method_async_override()
    async def revoke_token(self, name: str) -> str:
        return encode(await self._store().remove(name))
