"""Resolving ``$E:`` (deploying host environment) and ``$S:`` (secret) references.

zlayerctl collects the host variables a spec names (:func:`host_env_names`)
and sends their values with the deploy; schedd substitutes them
(:func:`resolve_env`) before anything runs, so a replica never sees a
reference. A ``$S:`` reference stays in the stored spec (so the spec never
holds a secret's value): schedd substitutes it (:func:`resolve_secrets`) only
in the assignment it sends agentd for a replica.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from shared.spec.models import DeploymentSpec

_REFERENCE = re.compile(r"\$([ES]):(@?[A-Za-z0-9_][A-Za-z0-9_./-]*)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UnresolvedReferenceError(ValueError):
    """A reference that cannot be resolved; the message names the field."""


def host_env_names(spec: DeploymentSpec) -> set[str]:
    """Every ``$E:VAR`` the spec's env values name."""
    names: set[str] = set()
    for service in spec.services.values():
        for value in service.env.values():
            for kind, name in _REFERENCE.findall(value):
                if kind == "E":
                    match = _ENV_NAME.match(name)
                    if match:
                        names.add(match.group(0))
    return names


def resolve_value(value: str, host_env: dict[str, str], where: str) -> str:
    """``value`` with its ``$E:`` references replaced (``$S:`` ones kept); raises
    UnresolvedReferenceError naming ``where``."""

    def substitute(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "S":
            return match.group(0)  # resolved when a replica's assignment is made
        env_name = _ENV_NAME.match(name)
        assert env_name is not None  # the spec validator refused malformed references
        rest = name[env_name.end() :]
        if env_name.group(0) not in host_env:
            raise UnresolvedReferenceError(
                f"{where}: `$E:{env_name.group(0)}` is not set in the environment of "
                "zlayerctl; export it before deploying"
            )
        return host_env[env_name.group(0)] + rest

    return _REFERENCE.sub(substitute, value)


def resolve_env(spec: DeploymentSpec, host_env: dict[str, str]) -> list[str]:
    """Substitute every env reference in place; return the problems, one sentence each."""
    problems: list[str] = []
    for service_name, service in spec.services.items():
        for key, value in list(service.env.items()):
            where = f"services.{service_name}.env.{key}"
            try:
                service.env[key] = resolve_value(value, host_env, where)
            except UnresolvedReferenceError as exc:
                problems.append(str(exc))
    return problems


# A secret's name, as the spec validator reads one after `$S:` (models._SECRET_REF).
_SECRET_REFERENCE = re.compile(
    r"\$S:(@[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"
    r"|[A-Za-z0-9][A-Za-z0-9_.-]*)"
)


def secret_names(value: str) -> list[str]:
    """The secrets ``value`` names, in order (``@service/name`` forms included as written)."""
    return _SECRET_REFERENCE.findall(value)


def resolve_secrets(value: str, lookup: Callable[[str], str | None], where: str) -> str:
    """``value`` with each ``$S:NAME`` replaced by ``lookup(NAME)``; raises
    UnresolvedReferenceError naming ``where`` and the secret (never a value)."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("@"):
            raise UnresolvedReferenceError(
                f"{where}: `$S:{name}` names a secret of another service, which this node "
                f"does not keep; use `$S:{name.split('/', 1)[1]}` and set it with "
                "`zlayerctl secret set`"
            )
        found = lookup(name)
        if found is None:
            raise UnresolvedReferenceError(
                f"{where}: secret {name} is not set; set it with "
                f"`zlayerctl secret set {name}` (add --deployment for this deployment only)"
            )
        return found

    resolved = _SECRET_REFERENCE.sub(substitute, value)
    if resolved != value and ("$S:" in resolved or "$E:" in resolved):
        # Values side by side can spell a reference agentd would read as one.
        raise UnresolvedReferenceError(
            f"{where}: its secrets, put together, contain `$S:` or `$E:`, which the node "
            "would read as a reference; set them without it"
        )
    return resolved
