"""Registry credentials and bearer tokens: what registryd presents to a registry.

Where credentials come from, in order:

1. The credential zlayerctl passes along with a pull or push. zlayerctl runs
   as the user, registryd as root (or a system user under systemd), so only
   zlayerctl can read the auth files that user already has from Docker or
   Podman: ``$REGISTRY_AUTH_FILE``, ``${XDG_RUNTIME_DIR}/containers/auth.json``
   (``/run/containers/0/auth.json`` for root without one),
   ``~/.config/containers/auth.json``, ``~/.docker/config.json``
   (:func:`shared.credentials.user_credential` reads them). It passes
   the one entry for the registry in question, nothing else.
2. registryd's own file, written by ``zlayerctl login``: ``auth.json`` in its
   state directory, mode 0600, in the same format as Docker's
   ``config.json`` (``{"auths": {"registry": {"auth": base64("user:pass")}}}``),
   so an operator can also copy one in.
3. The system-wide ``/etc/containers/auth.json``.

Bearer tokens obtained from a registry's token realm are cached per
(realm, service, scope) and reused until shortly before they expire.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.credentials import Credential, auth_key_host, entry_from_file, registry_keys
from shared.statefile import StateFormatError, read_state, write_atomically

SYSTEM_AUTH_FILE = Path("/etc/containers/auth.json")
TOKEN_SLACK = 10.0  # seconds before expiry a token is no longer handed out
DEFAULT_TOKEN_LIFETIME = 60.0  # the token spec's default for a missing expires_in


def _parse_auth_file(text: str) -> dict[str, Any]:
    document = json.loads(text)
    if not isinstance(document, dict):
        raise StateFormatError("it is not a JSON object")
    return document


class CredentialStore:
    """registryd's own credentials (``zlayerctl login``), in a 0600 Docker-format file."""

    def __init__(self, path: Path, system_file: Path = SYSTEM_AUTH_FILE) -> None:
        self.path = path
        self.system_file = system_file

    def _read(self) -> dict[str, Any]:
        """The file's document, to change; one that cannot be used is moved aside (logged)."""
        document = read_state(self.path, _parse_auth_file, "starting a new one")
        if document is None:
            return {"auths": {}}
        if not isinstance(document.get("auths"), dict):
            document["auths"] = {}
        return document

    def _write(self, document: dict[str, Any]) -> None:
        # 0600 from the start: a password never sits in a readable file.
        write_atomically(self.path, json.dumps(document, indent=1), mode=0o600)

    def get(self, registry: str) -> Credential | None:
        found = entry_from_file(self.path, registry)
        if found is None:
            found = entry_from_file(self.system_file, registry)
        return found

    def set(self, registry: str, credential: Credential) -> None:
        document = self._read()
        document["auths"][registry] = {"auth": credential.encoded()}
        self._write(document)

    def remove(self, registry: str) -> bool:
        document = self._read()
        wanted = auth_key_host(registry)
        removed = False
        for key in list(document["auths"]):
            if key in registry_keys(registry) or auth_key_host(str(key)) == wanted:
                del document["auths"][key]
                removed = True
        if removed:
            self._write(document)
        return removed


# ---------------------------------------------------------------- challenges and tokens

_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')
_ESCAPE_RE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Challenge:
    """A ``WWW-Authenticate`` challenge: ``Basic realm=...`` or ``Bearer realm=,service=``."""

    scheme: str  # "basic" or "bearer", lowercase
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scope(self) -> str:
        return self.params.get("scope", "")


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge in a ``WWW-Authenticate`` header; None if it has none.

    A header may carry several challenges (``Basic realm="a", Bearer
    realm="b"``): the parameters of the first end where the next scheme
    starts. A header that does not start with a scheme is no challenge.
    """
    text = header.strip()
    scheme, _, rest = text.partition(" ")
    if not _TOKEN_RE.fullmatch(scheme):
        return None
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM_RE.match(rest, position)
        if match is None:
            break  # the next challenge's scheme, or something this is not
        quoted, plain = match.group(2), match.group(3)
        value = _ESCAPE_RE.sub(r"\1", quoted) if quoted is not None else plain
        params.setdefault(match.group(1).lower(), value)
        position = match.end()
    return Challenge(scheme.lower(), params)


class TokenCache:
    """Bearer tokens by (realm, service, scope), kept until just before they expire."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str, str], tuple[str, float]] = {}

    def get(self, realm: str, service: str, scope: str, who: str) -> str | None:
        found = self._tokens.get((realm, service, scope, who))
        if found is None:
            return None
        token, expires = found
        if time.monotonic() >= expires - TOKEN_SLACK:
            del self._tokens[(realm, service, scope, who)]
            return None
        return token

    def put(
        self, realm: str, service: str, scope: str, who: str, token: str, lifetime: float
    ) -> None:
        self._tokens[(realm, service, scope, who)] = (token, time.monotonic() + lifetime)

    def forget(self, realm: str, service: str, scope: str, who: str) -> None:
        self._tokens.pop((realm, service, scope, who), None)
