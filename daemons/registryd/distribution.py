"""An OCI distribution client: the HTTP side of pulls and pushes (aiohttp).

:class:`Repository` speaks to one repository on one registry (or mirror):
the ``/v2/`` probe, authentication (anonymous, basic, bearer tokens from the
realm ``WWW-Authenticate`` names, with the repository's pull or push scope),
manifests (the ``Accept`` list of OCI and Docker schema 2 types, the
``Content-Type`` checked against the document's ``mediaType``, the digest
checked against ``Docker-Content-Digest`` and against a digest reference),
blob downloads streamed to the caller (which hashes and unpacks them as they
arrive) and resumed with ``Range``, and uploads (existence check with HEAD, cross-repository mount,
monolithic or chunked upload, manifest PUT).

Every failure becomes a :class:`~shared.bus.ZLayerError` carrying one
sentence about the registry, never an aiohttp exception.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import platform
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemons.registryd.auth import Challenge, TokenCache, parse_challenge
from shared.bus import (
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    ZLayerError,
)
from shared.credentials import Credential
from shared.lazy import lazy_module
from shared.reference import DEFAULT_DOMAIN

if TYPE_CHECKING:
    import aiohttp
    import yarl
    from yarl import URL
else:
    # with the first pull or push, not at start
    aiohttp = lazy_module("aiohttp")
    yarl = lazy_module("yarl")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
MAX_MANIFEST = 4 << 20  # the distribution spec's limit for a manifest
READ_CHUNK = 1 << 18  # at most this much of a blob is handed on at a time
MAX_REDIRECTS = 5
USER_AGENT = "zlayer-registryd"


@dataclass(frozen=True)
class Upload:
    """One blob a push sends: its digest, size, progress label and file."""

    digest: str
    size: int
    label: str
    path: Path


class CorruptBlobError(Exception):
    """A blob whose content is not its digest; the message says nothing was kept.

    Internal to registryd (sdbus errors cannot be subclassed): :func:`bus_error`
    turns it into the bus error callers see.
    """


class InterruptedTransferError(Exception):
    """The connection broke mid-transfer; the partial file stays for a resume."""


class UnresumableTransferError(InterruptedTransferError):
    """The registry would not resume a blob where it broke off: start it again from zero."""


def bus_error(exc: Exception) -> ZLayerError:
    """The bus error for one of the client's internal exceptions."""
    if isinstance(exc, InterruptedTransferError):
        return UnavailableError(str(exc))
    return ZLayerError(str(exc))


# ---------------------------------------------------------------- platforms


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def node_platform() -> Platform:
    """This node's platform in OCI terms (GOARCH names, ARM variants)."""
    machine = platform.machine()
    table = {
        "x86_64": ("amd64", ""),
        "amd64": ("amd64", ""),
        "aarch64": ("arm64", "v8"),
        "arm64": ("arm64", "v8"),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i686": ("386", ""),
        "ppc64le": ("ppc64le", ""),
        "s390x": ("s390x", ""),
        "riscv64": ("riscv64", ""),
    }
    architecture, variant = table.get(machine, (machine, ""))
    return Platform("linux", architecture, variant)


# Variants a CPU runs besides its own, best first (what containerd's matcher accepts).
_COMPATIBLE_VARIANTS = {
    ("arm", "v8"): ("v7", "v6", "v5"),
    ("arm", "v7"): ("v6", "v5"),
    ("arm", "v6"): ("v5",),
    ("amd64", ""): ("v1",),
}


def select_manifest(index: dict[str, Any], wanted: Platform) -> dict[str, Any] | None:
    """The descriptor in an image index for ``wanted``; None if it has none.

    An entry without a platform matches any (nested indexes often omit it);
    among matches, the exact variant wins over an entry without a variant
    (``arm64`` images usually carry none), that over an older variant the
    CPU also runs (``arm/v6`` on an ``arm/v7`` node), and the first listed
    wins a tie.
    """
    compatible = _COMPATIBLE_VARIANTS.get((wanted.architecture, wanted.variant), ())
    best: tuple[int, dict[str, Any]] | None = None
    for descriptor in index.get("manifests") or []:
        if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
            continue
        found = descriptor.get("platform")
        if not isinstance(found, dict):
            score = 1
        else:
            if found.get("os") != wanted.os or found.get("architecture") != wanted.architecture:
                continue
            variant = str(found.get("variant") or "")
            if variant == wanted.variant:
                score = 100
            elif not variant:
                score = 99
            elif variant in compatible:
                score = 98 - compatible.index(variant)
            else:
                continue
        if best is None or score > best[0]:
            best = (score, descriptor)
    return best[1] if best else None


def index_platforms(index: dict[str, Any]) -> list[str]:
    """The platforms an index offers, once each, for an error message."""
    found: list[str] = []
    for descriptor in index.get("manifests") or []:
        plat = descriptor.get("platform") if isinstance(descriptor, dict) else None
        if isinstance(plat, dict) and plat.get("os") != "unknown":
            text = str(
                Platform(
                    str(plat.get("os")),
                    str(plat.get("architecture")),
                    str(plat.get("variant") or ""),
                )
            )
            if text not in found:
                found.append(text)
    return found


def choose_manifest(index: dict[str, Any], wanted: Platform, name: str) -> str:
    """The digest of the entry of ``index`` (an image of ``name``) to use on ``wanted``.

    Raises NotFoundError with a sentence listing what the index offers.
    """
    chosen = select_manifest(index, wanted)
    if chosen is None:
        offered = ", ".join(index_platforms(index)) or "no platform at all"
        raise NotFoundError(
            f"{name} has no image for this node's platform {wanted} (it has: {offered})"
        )
    return str(chosen["digest"])


# ---------------------------------------------------------------- endpoints


def is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def registry_url(registry: str, insecure: list[str]) -> str:
    """The base URL of a registry: Docker Hub's API host, plain HTTP where allowed.

    Loopback registries are spoken to over plain HTTP, as Docker treats
    127.0.0.0/8 as insecure; others only when listed in ``insecure_registries``.
    """
    if registry == DEFAULT_DOMAIN:
        return "https://registry-1.docker.io"
    scheme = "http" if registry in insecure or is_loopback(registry) else "https"
    return f"{scheme}://{registry}"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return (
            f"TLS failed ({exc}); if it serves plain HTTP, add it to insecure_registries "
            "in registryd.toml"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        if isinstance(error, socket.gaierror):
            return "its name does not resolve (check the name, DNS and the network)"
        if error.errno:
            return os.strerror(error.errno).lower()
        return str(error.strerror or error).lower() or "connection failed"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"no answer within {timeout:.0f}s"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "it closed the connection"
    return str(exc) or type(exc).__name__


def _error_code(body: bytes) -> str:
    """The first error code of a distribution error body ("MANIFEST_UNKNOWN")."""
    try:
        document = json.loads(body)
        return str(document["errors"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


# ---------------------------------------------------------------- a repository


class Repository:
    """One repository on one registry or mirror, authenticated for ``actions``."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        registry: str,
        base_url: str,
        path: str,
        actions: str,
        credential: Credential | None,
        tokens: TokenCache,
        timeout: float,
        extra_scopes: tuple[str, ...] = (),
        probes: dict[str, Challenge | None] | None = None,
    ) -> None:
        self.http = http
        self.registry = registry  # the name people use, for messages and credentials
        self.base = yarl.URL(base_url)
        self.path = path
        self.actions = actions
        self.credential = credential
        self.tokens = tokens
        self.timeout = timeout
        self.scopes = (f"repository:{path}:{actions}", *extra_scopes)
        self.challenge: Challenge | None = None
        self.probed = False
        # What each registry's /v2/ answered, kept by the client: one probe per
        # registry, not one per pull (a changed challenge still comes as a 401).
        self.probes = probes

    @property
    def host(self) -> str:
        return self.base.authority

    def url(self, tail: str) -> URL:
        return self.base.with_path(f"/v2/{self.path}/{tail}", encoded=False)

    def _who(self) -> str:
        """Whose token: a cached token must never outlive a change of password."""
        if self.credential is None:
            return ""
        return hashlib.sha256(self.credential.basic().encode()).hexdigest()

    def _unreachable(self, exc: BaseException) -> UnavailableError:
        return UnavailableError(f"cannot reach registry {self.host}: {_reason(exc, self.timeout)}")

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)

    def refused(self) -> ZLayerError:
        if self.credential is None:
            return ZLayerError(
                f"the registry {self.registry} wants credentials for {self.path}; "
                f"run `zlayerctl login {self.registry}`"
            )
        return ZLayerError(
            f"the registry refused the credentials for {self.registry} "
            f"(user {self.credential.username}); run `zlayerctl login {self.registry}`"
        )

    # ------------------------------------------------------------ auth

    async def probe(self) -> None:
        """``GET /v2/``: is this a registry, and how does it want us to authenticate?"""
        if self.probed:
            return
        if self.probes is not None and str(self.base) in self.probes:
            self.challenge = self.probes[str(self.base)]
            self.probed = True
            return
        try:
            async with self.http.get(
                self.base.with_path("/v2/"), timeout=self._timeout(), allow_redirects=False
            ) as response:
                await response.read()
                if response.status == 401:
                    self.challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
                elif response.status not in (200, 404):
                    # 404: some registries serve no /v2/ root; the calls below will tell.
                    raise UnavailableError(
                        f"{self.host} does not answer as a registry (GET /v2/ gave HTTP "
                        f"{response.status})"
                    )
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None
        except TimeoutError as exc:
            raise self._unreachable(exc) from None
        self.probed = True
        if self.probes is not None:
            self.probes[str(self.base)] = self.challenge

    async def _authorization(self) -> str | None:
        challenge = self.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if self.credential is None:
                raise self.refused()
            return self.credential.basic()
        if challenge.scheme == "bearer":
            return "Bearer " + await self._token(challenge)
        raise UnavailableError(
            f"the registry {self.registry} asks for {challenge.scheme} authentication, "
            "which ZLayer does not speak (basic and bearer tokens only)"
        )

    async def _token(self, challenge: Challenge) -> str:
        scope = " ".join(self.scopes)
        cached = self.tokens.get(challenge.realm, challenge.service, scope, self._who())
        if cached is not None:
            return cached
        if not challenge.realm.startswith(("http://", "https://")):
            raise UnavailableError(
                f"the registry {self.registry} names no usable token realm ({challenge.realm!r})"
            )
        query: list[tuple[str, str]] = []
        if challenge.service:
            query.append(("service", challenge.service))
        query.extend(("scope", s) for s in self.scopes)
        headers = {"User-Agent": USER_AGENT}
        realm = yarl.URL(challenge.realm)
        withheld = self._unsafe_realm(realm)
        if self.credential is not None and not withheld:
            headers["Authorization"] = self.credential.basic()
        try:
            async with self.http.get(
                realm.update_query(query), headers=headers, timeout=self._timeout()
            ) as response:
                body = await response.read()
                if response.status in (401, 403):
                    if self.credential is not None and withheld:
                        raise self._withheld(realm, withheld)
                    raise self.refused()
                if response.status != 200:
                    raise UnavailableError(
                        f"the token service of {self.registry} ({realm.host}) answered HTTP "
                        f"{response.status}"
                    )
        except aiohttp.ClientError as exc:
            raise UnavailableError(
                f"cannot reach the token service of {self.registry} ({realm.host}): "
                f"{_reason(exc, self.timeout)}"
            ) from None
        try:
            document = json.loads(body)
            token = str(document.get("token") or document.get("access_token") or "")
            lifetime = float(document.get("expires_in") or 0) or 60.0
        except (ValueError, AttributeError, TypeError):
            token, lifetime = "", 0.0
        if not token:
            raise UnavailableError(f"the token service of {self.registry} gave no token")
        self.tokens.put(challenge.realm, challenge.service, scope, self._who(), token, lifetime)
        return token

    def _unsafe_realm(self, realm: URL) -> str:
        """Why credentials must not go to ``realm``; "" if they may.

        A token realm over HTTPS may be any host (Docker Hub's is). Over plain
        HTTP the password could be read on the way: only the registry's own
        host, itself reached over plain HTTP (a loopback or insecure registry),
        is trusted with it.
        """
        if realm.scheme == "https":
            return ""
        if self.base.scheme == "https":
            return "while the registry itself uses HTTPS"
        if realm.host != self.base.host:
            return f"on another host than the registry's own ({self.base.host})"
        return ""

    def _withheld(self, realm: URL, reason: str) -> ZLayerError:
        return ZLayerError(
            f"the registry {self.registry} wants credentials sent to its token service "
            f"{realm.origin()} over plain HTTP, {reason}; ZLayer will not send them there: "
            "ask its operator to serve the token service over HTTPS"
        )

    async def verify_login(self) -> None:
        """Check the credential against the registry (login): a token or a /v2/ answer."""
        await self.probe()
        if self.challenge is None:
            return
        if self.challenge.scheme == "bearer":
            realm = yarl.URL(self.challenge.realm)
            withheld = self._unsafe_realm(realm) if realm.absolute else ""
            if withheld:  # an anonymous token would prove nothing about the credentials
                raise self._withheld(realm, withheld)
            self.scopes = ()
            await self._token(self.challenge)
            return
        async with self.request("GET", self.base.with_path("/v2/")) as response:
            if response.status != 200:
                raise UnavailableError(
                    f"the registry {self.registry} answered HTTP {response.status} to a login"
                )

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: URL,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        redirects: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An authenticated request; a 401 refreshes the token once, then is an error.

        Redirects are followed by hand: a blob's storage backend on another
        host must not receive the registry's credentials.
        """
        await self.probe()
        response: aiohttp.ClientResponse | None = None
        try:
            for attempt in (1, 2):
                sent = dict(headers or {})
                sent["User-Agent"] = USER_AGENT
                authorization = await self._authorization()
                if authorization:
                    sent["Authorization"] = authorization
                response = await self.http.request(
                    method,
                    url,
                    headers=sent,
                    data=data,
                    allow_redirects=False,
                    timeout=self._timeout(),
                )
                if (
                    response.status == 401
                    and attempt == 1
                    and not callable(getattr(data, "read", None))
                ):
                    challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
                    response.release()
                    response = None
                    if challenge is not None and challenge.scheme == "bearer":
                        scope = " ".join(self.scopes)
                        self.tokens.forget(challenge.realm, challenge.service, scope, self._who())
                    self.challenge = challenge or self.challenge
                    if self.probes is not None:
                        self.probes[str(self.base)] = self.challenge
                    continue
                break
            assert response is not None
            if response.status == 401:
                response.release()
                raise self.refused()
            if response.status == 403:
                response.release()
                raise ZLayerError(
                    f"the registry {self.registry} denied {self.actions} access to {self.path}"
                )
            hops = 0
            while redirects and response.status in (301, 302, 303, 307, 308):
                hops += 1
                location = response.headers.get("Location", "")
                response.release()
                if hops > MAX_REDIRECTS or not location:
                    raise UnavailableError(f"the registry {self.registry} redirects in circles")
                target = url.join(yarl.URL(location))
                forward = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
                if target.origin() == url.origin():
                    authorization = await self._authorization()
                    if authorization:
                        forward["Authorization"] = authorization
                response = await self.http.request(
                    "GET" if response.status == 303 else method,
                    target,
                    headers=forward,
                    allow_redirects=False,
                    timeout=self._timeout(),
                )
                url = target
            yield response
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise InterruptedTransferError(
                f"the registry {self.host} broke the connection ({_reason(exc, self.timeout)})"
            ) from None
        except TimeoutError as exc:
            raise self._unreachable(exc) from None
        finally:
            if response is not None:
                response.release()

    # ------------------------------------------------------------ manifests

    async def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index by tag or digest."""
        async with self.request(
            "GET", self.url(f"manifests/{reference}"), headers={"Accept": ACCEPT}
        ) as response:
            if response.status == 404:
                body = await response.read()
                code = _error_code(body)
                if code != "NAME_UNKNOWN" and not await self._repository_exists():
                    code = "NAME_UNKNOWN"
                if code == "NAME_UNKNOWN":
                    raise NotFoundError(
                        f"the registry {self.registry} has no repository {self.path}"
                    )
                if reference.startswith("sha256:"):
                    raise NotFoundError(
                        f"the registry {self.registry} has no manifest {reference} for {self.path}"
                    )
                raise NotFoundError(f"the registry has no tag {reference} for {self.path}")
            if response.status != 200:
                raise UnavailableError(
                    f"the registry {self.registry} answered HTTP {response.status} for the "
                    f"manifest of {self.path}:{reference}"
                )
            body = await self._read_limited(response, MAX_MANIFEST, "manifest")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = response.headers.get("Docker-Content-Digest", "")
        digest = digest_of(body)
        where = f"{self.path}:{reference}" if not reference.startswith("sha256:") else self.path
        if reference.startswith("sha256:") and digest != reference:
            raise ZLayerError(
                f"the registry {self.registry} sent a manifest for {reference} whose content is "
                f"{digest}; refusing it"
            )
        if header_digest and header_digest != digest:
            raise ZLayerError(
                f"the manifest of {where} does not match the digest the registry gives "
                f"({header_digest}); refusing it"
            )
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ZLayerError(f"the manifest of {where} is not valid JSON") from None
        if not isinstance(document, dict):
            raise ZLayerError(f"the manifest of {where} is not a JSON object")
        declared = str(document.get("mediaType") or "")
        if declared and content_type and declared != content_type:
            raise ZLayerError(
                f"the registry {self.registry} served the manifest of {where} as {content_type} "
                f"but it says it is {declared}; refusing it"
            )
        media_type = declared or content_type
        if not media_type:
            media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
        if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
            raise InvalidArgumentError(
                f"{where} is a {media_type}, not an image ZLayer can run (OCI or Docker "
                "schema 2 manifests and indexes)"
            )
        return body, media_type, digest

    async def _repository_exists(self) -> bool:
        """Whether the registry knows the repository (a 404 for a tag does not say)."""
        url = self.url("tags/list").with_query({"n": "1"})
        async with self.request("GET", url) as response:
            if response.status != 404:
                return True
            return _error_code(await response.read()) != "NAME_UNKNOWN"

    async def put_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        async with self.request(
            "PUT",
            self.url(f"manifests/{reference}"),
            headers={"Content-Type": media_type},
            data=body,
        ) as response:
            text = await response.read()
            if response.status not in (200, 201):
                raise ZLayerError(
                    f"the registry {self.registry} refused the manifest for "
                    f"{self.path}:{reference} (HTTP {response.status}: "
                    f"{_error_code(text) or text[:200].decode(errors='replace')})"
                )
            return response.headers.get("Docker-Content-Digest", "")

    async def _read_limited(self, response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        data = bytearray()
        async for chunk in response.content.iter_chunked(1 << 16):
            data.extend(chunk)
            if len(data) > limit:
                raise ZLayerError(f"the {what} the registry {self.registry} sent is too large")
        return bytes(data)

    # ------------------------------------------------------------ blobs

    async def get_small_blob(self, digest: str, limit: int) -> bytes:
        """A config blob, verified against its digest."""
        async with self.request("GET", self.url(f"blobs/{digest}")) as response:
            if response.status == 404:
                raise NotFoundError(f"the registry {self.registry} has no blob {digest}")
            if response.status != 200:
                raise UnavailableError(
                    f"the registry {self.registry} answered HTTP {response.status} "
                    f"for blob {digest}"
                )
            data = await self._read_limited(response, limit, "image config")
        if digest_of(data) != digest:
            raise CorruptBlobError(
                f"the registry {self.registry} sent blob {digest} with other content; "
                "nothing was kept"
            )
        return data

    async def download_blob(
        self, digest: str, offset: int, write: Callable[[bytes], Awaitable[None]]
    ) -> bool:
        """Stream blob ``digest`` from byte ``offset`` on into ``write``; True if a Range was used.

        A registry that answers a Range with the whole blob has its first
        ``offset`` bytes skipped. A broken connection raises
        :class:`InterruptedTransferError`: what ``write`` was given is good,
        and a resume starts after it. A registry that will not resume where
        asked raises :class:`UnresumableTransferError`: start from zero.
        Checking the digest is the caller's part, as the bytes stream past.
        """
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        ranged = False
        skip = 0
        received = 0
        async with self.request("GET", self.url(f"blobs/{digest}"), headers=headers) as response:
            if response.status == 404:
                raise NotFoundError(f"the registry {self.registry} has no blob {digest}")
            if response.status == 416:
                raise UnresumableTransferError(
                    f"the registry {self.registry} refused to resume blob {digest}"
                )
            if response.status == 206:
                if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                    raise UnresumableTransferError(
                        f"the registry {self.registry} resumed blob {digest} at the wrong offset"
                    )
                ranged = True
            elif response.status == 200:
                skip = offset  # it cannot (or will not) resume: the first bytes are here already
            else:
                raise UnavailableError(
                    f"the registry {self.registry} answered HTTP {response.status} "
                    f"for blob {digest}"
                )
            try:
                async for chunk in response.content.iter_chunked(READ_CHUNK):
                    if skip:
                        dropped = min(skip, len(chunk))
                        skip -= dropped
                        chunk = chunk[dropped:]
                        if not chunk:
                            continue
                    received += len(chunk)
                    await write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, TimeoutError) as exc:
                raise InterruptedTransferError(
                    f"the registry {self.host} broke off blob {digest} after "
                    f"{offset + received} bytes ({_reason(exc, self.timeout)})"
                ) from None
        return ranged

    async def blob_exists(self, digest: str) -> bool:
        async with self.request("HEAD", self.url(f"blobs/{digest}")) as response:
            return response.status == 200

    async def mount_blob(self, digest: str, source: str) -> URL | None:
        """Mount ``digest`` from ``source`` (a repository on the same registry).

        None when it was mounted; otherwise the upload URL the registry opened instead.
        """
        url = self.url("blobs/uploads/").with_query({"mount": digest, "from": source})
        async with self.request("POST", url, redirects=False) as response:
            if response.status == 201:
                return None
            return self._upload_location(response, url)

    async def start_upload(self) -> URL:
        url = self.url("blobs/uploads/")
        async with self.request("POST", url, redirects=False) as response:
            return self._upload_location(response, url)

    def _upload_location(self, response: aiohttp.ClientResponse, url: URL) -> URL:
        location = response.headers.get("Location", "")
        if response.status != 202 or not location:
            raise ZLayerError(
                f"the registry {self.registry} would not start an upload to {self.path} "
                f"(HTTP {response.status})"
            )
        return url.join(yarl.URL(location))

    async def upload_blob(
        self,
        location: URL,
        path: Path,
        digest: str,
        size: int,
        chunk_size: int,
        on_progress: Callable[[int], None],
    ) -> None:
        """Upload the file ``path``: one PUT up to ``chunk_size``, PATCHes beyond."""
        if size <= chunk_size:
            handle = await asyncio.to_thread(open, path, "rb")
            try:
                async with self.request(
                    "PUT",
                    location.update_query({"digest": digest}),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                    data=handle,
                    redirects=False,
                ) as response:
                    await self._expect_created(response, digest)
            finally:
                handle.close()  # aiohttp may have closed it already; closing twice is fine
            on_progress(size)
            return
        offset = 0
        handle = await asyncio.to_thread(open, path, "rb")
        try:
            while offset < size:
                chunk = await asyncio.to_thread(handle.read, chunk_size)
                end = offset + len(chunk) - 1
                async with self.request(
                    "PATCH",
                    location,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{end}",
                        "Content-Length": str(len(chunk)),
                    },
                    data=chunk,
                    redirects=False,
                ) as response:
                    if response.status != 202:
                        raise ZLayerError(
                            f"the registry {self.registry} refused a chunk of blob {digest} "
                            f"(HTTP {response.status})"
                        )
                    location = location.join(
                        yarl.URL(response.headers.get("Location", str(location)))
                    )
                offset = end + 1
                on_progress(offset)
        finally:
            handle.close()
        async with self.request(
            "PUT",
            location.update_query({"digest": digest}),
            headers={"Content-Length": "0"},
            redirects=False,
        ) as response:
            await self._expect_created(response, digest)

    async def _expect_created(self, response: aiohttp.ClientResponse, digest: str) -> None:
        body = await response.read()
        if response.status != 201:
            raise ZLayerError(
                f"the registry {self.registry} refused blob {digest} (HTTP {response.status}"
                f"{': ' + _error_code(body) if _error_code(body) else ''})"
            )
