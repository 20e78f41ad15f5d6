"""Daemon configuration: ``/etc/zlayer/<daemon>.toml`` plus environment overrides.

Each daemon declares a settings class derived from :class:`DaemonSettings`
(a ``msgspec.Struct``: fields with defaults, constraints as
``Annotated[int, Meta(ge=0)]``, checks in ``__post_init__`` raising
:func:`invalid`). A value set in the environment (``ZLAYER_<DAEMON>_<KEY>``;
lists, tables and records as JSON) wins over the file, which wins over the
built-in default, so a unit's ``Environment=`` line or a test can override
one key without editing the file. Unknown keys in the file are rejected,
like unknown spec keys.

msgspec, not pydantic: every daemon loads its settings, and most need
nothing else of pydantic at idle.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import msgspec
from msgspec import Meta

from shared.paths import Paths

LogLevel = Literal["debug", "info", "warning", "error"]

# Types msgspec does not know, built from their string form.
_FROM_STRING: tuple[type, ...] = (Path, IPv4Address, IPv4Network, IPv6Address, IPv6Network)
_AT = re.compile(r"^(?P<msg>.*) - at `\$\.?(?P<key>[^`]*)`$", re.DOTALL)
_UNKNOWN = re.compile(r"unknown field `(?P<key>[^`]*)`")


class ConfigError(Exception):
    """A configuration file or override that cannot be used, in one sentence."""


def invalid(key: str, message: str) -> ValueError:
    """The error a settings class's ``__post_init__`` raises for a bad value of ``key``."""
    return ValueError(f"{message} - at `$.{key}`")


class DaemonSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, dict=True):
    """Keys every daemon understands."""

    log_level: LogLevel = "info"
    # the address the Prometheus endpoint binds
    metrics_bind: str = "0.0.0.0"
    # Prometheus port; unset means the daemon's default, 0 a free one
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] | None = None
    # ping the systemd watchdog when WATCHDOG_USEC is set
    watchdog: bool = True

    @property
    def model_fields_set(self) -> frozenset[str]:
        """The keys the file or the environment set (the rest are defaults)."""
        given: frozenset[str] = self.__dict__.get("_given", frozenset())
        return given

    @classmethod
    def load(cls, daemon: str, paths: Paths) -> Self:
        """Read ``<config_dir>/<daemon>.toml`` (if present) and ``ZLAYER_<DAEMON>_*``."""
        path = paths.daemon_config(daemon)
        values = _read_toml(path)
        env_prefix = f"ZLAYER_{daemon.upper()}_"
        values.update(_from_environment(cls, env_prefix, os.environ))
        try:
            settings = msgspec.convert(values, cls, strict=False, dec_hook=_from_string)
        except msgspec.ValidationError as exc:
            key, message = _key_and_message(str(exc))
            raise ConfigError(
                f"{path}: `{key}`: {message}; fix the file or the "
                f"{env_prefix}{key.split('.')[0].split('[')[0].upper()} environment variable"
            ) from None
        settings.__dict__["_given"] = frozenset(values)
        return settings


def _from_string(kind: type, value: Any) -> Any:
    if kind in _FROM_STRING and isinstance(value, str):
        return kind(value)
    raise NotImplementedError


def _key_and_message(error: str) -> tuple[str, str]:
    found = _AT.match(error)
    if found:
        return found["key"] or "(top level)", found["msg"]
    unknown = _UNKNOWN.search(error)
    if unknown:
        return unknown["key"], "not a key this daemon understands"
    return "(top level)", error


def _structured(annotation: Any) -> bool:
    """Whether an environment value for a field of this type is JSON (lists, tables, records)."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_structured(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin in (list, dict, tuple, set, frozenset):
        return True
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def _from_environment(
    cls: type[DaemonSettings], env_prefix: str, environ: Mapping[str, str]
) -> dict[str, Any]:
    """The fields set in the environment, by name (``ZLAYER_APID_HTTP_PORT=8081``)."""
    by_name = {name.upper(): value for name, value in environ.items()}
    found: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        variable = f"{env_prefix}{field.name}".upper()
        if variable not in by_name:
            continue
        value: Any = by_name[variable]
        if _structured(field.type):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(
                    f"{variable} is not valid JSON; `{field.name}` takes a list or a table"
                ) from None
        found[field.name] = value
    return found


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix or remove it") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
