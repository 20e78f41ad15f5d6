"""Registry credentials in Docker and Podman auth files: their format, and the user's.

Owns :class:`Credential`, reading the entry for one registry out of a file
in the ``config.json`` / ``auth.json`` format (``{"auths": {"registry":
{"auth": base64("user:pass")}}}``, with the spellings Docker Hub goes by),
and finding the auth files of the user running zlayerctl, in the order
Podman reads them: ``$REGISTRY_AUTH_FILE``,
``${XDG_RUNTIME_DIR}/containers/auth.json`` (``/run/containers/0/auth.json``
for root without one), ``~/.config/containers/auth.json``,
``~/.docker/config.json``. zlayerctl passes registryd the one entry for the
registry at hand (:func:`user_credential`); registryd keeps its own file in
the same format (``daemons/registryd/auth.py``).
"""

from __future__ import annotations

import os
from typing import Any

from shared.reference import DEFAULT_DOMAIN

# Docker Hub appears under several spellings in people's auth files.
DOCKER_HUB_KEYS = (
    "docker.io",
    "https://index.docker.io/v1/",
    "index.docker.io",
    "registry-1.docker.io",
    "https://registry-1.docker.io",
)


class Credential:
    """A registry user name and password; immutable and compared by value.

    A plain class, not a dataclass, for zlayerctl's start-up (see
    :class:`shared.reference.Reference`); its repr leaves the password out.
    """

    __slots__ = ("password", "username")
    __match_args__ = ("username", "password")
    username: str
    password: str

    def __init__(self, username: str, password: str) -> None:
        object.__setattr__(self, "username", username)
        object.__setattr__(self, "password", password)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Credential)
        return (self.username, self.password) == (other.username, other.password)

    def __hash__(self) -> int:
        return hash((self.username, self.password))

    def __repr__(self) -> str:
        return f"Credential(username={self.username!r}, password='***')"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of an immutable Credential")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of an immutable Credential")

    def __reduce__(self) -> tuple[type[Credential], tuple[str, str]]:
        # through __init__: copy and pickle would otherwise set the slots with setattr
        return (Credential, (self.username, self.password))

    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        import base64

        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def encoded(self) -> str:
        """The ``auth`` field of a Docker config entry."""
        import base64

        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    @classmethod
    def decode(cls, auth: str) -> Credential | None:
        """The credential in a Docker config ``auth`` field; None if it is not one."""
        import base64
        import binascii

        try:
            text = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        username, colon, password = text.partition(":")
        return cls(username, password) if colon and username else None


def registry_keys(registry: str) -> tuple[str, ...]:
    """The keys a registry may have in an auth file."""
    if registry == DEFAULT_DOMAIN:
        return DOCKER_HUB_KEYS
    return (registry, f"https://{registry}", f"http://{registry}")


def auth_key_host(key: str) -> str:
    """The registry an auth file key names: ``https://host:5000/v1/`` -> ``host:5000``."""
    host = key.strip().removeprefix("https://").removeprefix("http://").split("/")[0]
    return DEFAULT_DOMAIN if host in DOCKER_HUB_KEYS else host


def _entry_credential(entry: Any) -> Credential | None:
    """The credential of one ``auths`` entry: ``auth`` (base64), else username/password."""
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        found = Credential.decode(auth)
        if found is not None:
            return found
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(password, str) and username:
        return Credential(username, password)
    return None


def entry_from_file(path: str | os.PathLike[str], registry: str) -> Credential | None:
    """The credential for ``registry`` in the auth file at ``path``; None if it has none."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return None
    import json  # only for a file that is there: many users have none of the four

    try:
        document = json.loads(text)
    except ValueError:
        return None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        return None
    # The exact spellings first, then any key naming the same host (with a
    # scheme or a path, as `docker login` wrote them in older versions).
    for key in registry_keys(registry):
        found = _entry_credential(auths.get(key))
        if found is not None:
            return found
    wanted = auth_key_host(registry)
    for key, entry in auths.items():
        if auth_key_host(str(key)) == wanted:
            found = _entry_credential(entry)
            if found is not None:
                return found
    return None


def user_auth_files(environ: dict[str, str] | None = None, uid: int | None = None) -> list[str]:
    """The auth files of the user running zlayerctl, in the order Podman reads them.

    Paths as strings: pathlib (and the urllib.parse and ipaddress it imports)
    was a good part of what a warm ``zlayerctl pull`` imported for nothing else.
    """
    env = os.environ if environ is None else environ
    user = os.getuid() if uid is None else uid
    join = os.path.join
    files: list[str] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        files.append(join(env["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    elif user == 0:
        # `podman login` as root without a runtime directory writes here.
        files.append(f"/run/containers/{user}/auth.json")
    if env.get("XDG_CONFIG_HOME"):
        files.append(join(env["XDG_CONFIG_HOME"], "containers", "auth.json"))
    elif env.get("HOME"):
        files.append(join(env["HOME"], ".config", "containers", "auth.json"))
    docker_config = env.get("DOCKER_CONFIG")
    if docker_config:
        files.append(join(docker_config, "config.json"))
    elif env.get("HOME"):
        files.append(join(env["HOME"], ".docker", "config.json"))
    return files


def user_credential(registry: str, environ: dict[str, str] | None = None) -> str:
    """The user's Docker/Podman credential for ``registry``, encoded; "" if none."""
    for path in user_auth_files(environ):
        found = entry_from_file(path, registry)
        if found is not None:
            return found.encoded()
    return ""
