"""Where zlayerctl sends its commands: a node's REST API, or the daemons' bus here.

In order: the global option ``--host URL`` (with ``ZLAYER_TOKEN``), else
``ZLAYER_HOST`` (with ``ZLAYER_TOKEN``), else the current context of
``$XDG_CONFIG_HOME/zlayer/contexts.toml`` (``zlayerctl context add/use``), else
the local bus. A host given by option or environment takes the token and CA file
of a context naming the same host when ``ZLAYER_TOKEN`` is not set.

The option and the cheap test of whether any of these is set live in
``ctl.readargs``, which the read commands import anyway: the local path pays
one ``os.stat`` (no contexts file: this module is not even imported), so the
read commands start as fast as before; tomllib is imported only when a
contexts file exists.
"""

from __future__ import annotations

import os
from typing import Any

from ctl.readargs import HOST_ENV, TOKEN_ENV, contexts_path, host_option

# plain http reaches only this node; anything else must be https (the API serves TLS there)
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class TargetError(Exception):
    """A host, context or contexts file that cannot be used; its text is one sentence."""


class Target:
    """A node's REST API: its base URL, the bearer token and the CA file to trust."""

    __slots__ = ("ca_file", "context", "host", "token")

    def __init__(self, host: str, token: str = "", ca_file: str = "", context: str = "") -> None:
        self.host = host.rstrip("/")
        self.token = token
        self.ca_file = ca_file
        self.context = context  # the context it came from, "" for --host or ZLAYER_HOST

    def __repr__(self) -> str:  # never the token
        return f"Target({self.host!r}, context={self.context!r})"


def check_host(host: str) -> str:
    """``host`` as a base URL, or TargetError when it is not one zlayerctl may use."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(host)
        hostname = parts.hostname or ""
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    except ValueError:
        raise TargetError(f"{host} is not a URL; give one such as https://node:3669") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise TargetError(f"{host} is not an http(s) URL; give one such as https://node:3669")
    if parts.scheme == "http" and hostname not in LOOPBACK:
        raise TargetError(
            f"plain http is allowed only to this node (127.0.0.1, ::1, localhost); "
            f"use https://{parts.netloc} for {hostname}"
        )
    return host.rstrip("/")


def read_contexts(path: str | None = None) -> dict[str, Any] | None:
    """The contexts file as a table, or None when there is none."""
    path = path or contexts_path()
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TargetError(f"cannot read {path}: {exc.strerror}") from None
    import tomllib

    try:
        table = tomllib.loads(data.decode("utf-8", errors="replace"))
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path} is not valid TOML ({exc}); fix or remove it") from None
    return table


def _context_target(name: str, entry: Any) -> Target:
    if not isinstance(entry, dict) or not isinstance(entry.get("host"), str):
        raise TargetError(
            f"context {name} in {contexts_path()} has no host; "
            f"add it again with `zlayerctl context add {name} --host URL`"
        )
    token = entry.get("token", "")
    ca_file = entry.get("ca_file", "")
    return Target(
        entry["host"],
        token if isinstance(token, str) else "",
        ca_file if isinstance(ca_file, str) else "",
        name,
    )


def target() -> Target | None:
    """Where this command goes: a node's API, or None for the local bus."""
    token = os.environ.get(TOKEN_ENV, "")
    given = host_option()
    host = given if given is not None else os.environ.get(HOST_ENV, "")
    if not host and given is None:
        if not os.path.exists(contexts_path()):
            return None  # the common local case: one stat, no import
        table = read_contexts()
        current = table.get("current") if table else None
        if not table or not isinstance(current, str) or not current:
            return None
        contexts = table.get("contexts", {})
        if not isinstance(contexts, dict) or current not in contexts:
            raise TargetError(
                f"the current context {current} is not in {contexts_path()}; "
                "pick one with `zlayerctl context use NAME`"
            )
        found = _context_target(current, contexts[current])
        check_host(found.host)
        if token:
            found.token = token
        return found
    if not host:
        raise TargetError("--host needs a URL, such as https://node:3669")
    base = check_host(host)
    ca_file = ""
    if not token and os.path.exists(contexts_path()):
        # a context for the same host lends its token and CA file
        table = read_contexts() or {}
        contexts = table.get("contexts", {})
        for name, entry in contexts.items() if isinstance(contexts, dict) else ():
            if isinstance(entry, dict) and str(entry.get("host", "")).rstrip("/") == base:
                found = _context_target(name, entry)
                token, ca_file = found.token, found.ca_file
                break
    return Target(base, token, ca_file)
