"""Image references: parsing and the normalised form ZLayer stores and compares.

``busybox`` and ``docker.io/library/busybox:latest`` name the same image;
everything that stores or compares image names goes through
:func:`parse_reference` so that both spell it the same way. The grammar is
the one Docker's and containerd's reference packages accept (domain, path
components, tag, digest); IPv6 literal domains are not supported.
"""

from __future__ import annotations

import re
from typing import Any

DEFAULT_DOMAIN = "docker.io"
OFFICIAL_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?")
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


class InvalidReferenceError(ValueError):
    """An image reference that does not parse; the message is one sentence."""


class Reference:
    """A normalised image reference: ``domain/path[:tag][@digest]``.

    Immutable and compared by value, as a frozen dataclass would be; a plain
    class because importing dataclasses (inspect, ast, dis) was a good part of
    a warm ``zlayerctl pull``'s start-up.
    """

    __slots__ = ("digest", "domain", "path", "tag")
    __match_args__ = ("domain", "path", "tag", "digest")
    domain: str
    path: str
    tag: str | None
    digest: str | None

    def __init__(
        self, domain: str, path: str, tag: str | None = None, digest: str | None = None
    ) -> None:
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "tag", tag)
        object.__setattr__(self, "digest", digest)

    def _fields(self) -> tuple[str, str, str | None, str | None]:
        return (self.domain, self.path, self.tag, self.digest)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Reference)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"Reference(domain={self.domain!r}, path={self.path!r}, "
            f"tag={self.tag!r}, digest={self.digest!r})"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of an immutable Reference")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of an immutable Reference")

    def __reduce__(self) -> tuple[type[Reference], tuple[str, str, str | None, str | None]]:
        # through __init__: copy and pickle would otherwise set the slots with setattr
        return (Reference, self._fields())

    @property
    def repository(self) -> str:
        """``docker.io/library/busybox``: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """The short form people type: ``busybox:latest``, ``zlayer/busybox:1``."""
        path = self.path
        if self.domain == DEFAULT_DOMAIN:
            if path.startswith(OFFICIAL_NAMESPACE + "/"):
                path = path[len(OFFICIAL_NAMESPACE) + 1 :]
            text = path
        else:
            text = f"{self.domain}/{path}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    # Docker's rule: the first component is a registry only if it looks like
    # a host (a dot, a port, "localhost", or capitals, which paths never have).
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return DEFAULT_DOMAIN, name


def parse_reference(text: str, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse and normalise ``text``; the default tag is added when it has no tag or digest.

    Raises :class:`InvalidReferenceError` with a sentence naming what is wrong.
    """
    original = text
    if not text or text != text.strip():
        raise InvalidReferenceError(f"{original!r} is not an image reference")
    digest: str | None = None
    if "@" in text:
        text, _, digest = text.partition("@")
        if not _DIGEST_RE.fullmatch(digest):
            raise InvalidReferenceError(
                f"the digest in {original!r} is not valid (expected sha256:<64 hex digits>)"
            )
        if digest.startswith("sha256:") and not _SHA256_RE.fullmatch(digest):
            raise InvalidReferenceError(
                f"the digest in {original!r} is not valid (expected sha256:<64 hex digits>)"
            )
    tag: str | None = None
    # A colon after the last slash separates the tag; one before it is a port.
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReferenceError(
                f"the tag in {original!r} is not valid (letters, digits, '_', '.', '-'; "
                "at most 128 characters)"
            )
    if not text:
        raise InvalidReferenceError(f"{original!r} has no image name")
    if _HEX64_RE.fullmatch(text) and tag is None and digest is None:
        raise InvalidReferenceError(
            f"{original!r} looks like an image id, not a name; use it where an id is accepted"
        )
    domain, path = _split_domain(text)
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidReferenceError(f"the registry {domain!r} in {original!r} is not a host name")
    if domain == "index.docker.io":
        domain = DEFAULT_DOMAIN
    if path != path.lower():
        raise InvalidReferenceError(f"the repository name in {original!r} must be lowercase")
    components = path.split("/")
    for component in components:
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise InvalidReferenceError(
                f"{component!r} in {original!r} is not a valid name component "
                "(lowercase letters and digits, separated by '.', '_', '__' or '-')"
            )
    if domain == DEFAULT_DOMAIN and len(components) == 1:
        path = f"{OFFICIAL_NAMESPACE}/{path}"
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise InvalidReferenceError(
            f"the repository name in {original!r} is longer than {MAX_NAME_LENGTH} characters"
        )
    if tag is None and digest is None:
        tag = default_tag
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def normalize_reference(text: str) -> str:
    """``busybox`` -> ``docker.io/library/busybox:latest``; raises InvalidReferenceError."""
    return str(parse_reference(text))


def is_reference(text: str) -> bool:
    """True when ``text`` parses as an image reference."""
    try:
        parse_reference(text)
    except InvalidReferenceError:
        return False
    return True
