"""Daemon configuration: ``/etc/zlayer/<daemon>.toml`` plus environment overrides.

Each daemon declares a settings class derived from :class:`DaemonSettings`
with its own ``env_prefix`` (``ZLAYER_SCHEDD_`` ...). A value set in the
environment wins over the file, which wins over the built-in default, so a
unit's ``Environment=`` line or a test can override one key without editing
the file. Unknown keys in the file are rejected, like unknown spec keys.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.paths import Paths

LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(Exception):
    """A configuration file or override that cannot be used, in one sentence."""


class DaemonSettings(BaseSettings):
    """Keys every daemon understands."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix="ZLAYER_")

    log_level: LogLevel = "info"
    metrics_bind: str = Field("0.0.0.0", description="address the Prometheus endpoint binds")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Prometheus port; unset means the daemon's default, 0 a free one",
    )
    watchdog: bool = Field(True, description="ping the systemd watchdog when WATCHDOG_USEC is set")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; the environment overrides them.
        return (env_settings, init_settings)

    @classmethod
    def load(cls, daemon: str, paths: Paths) -> Self:
        """Read ``<config_dir>/<daemon>.toml`` (if present) and ``ZLAYER_<DAEMON>_*``."""
        path = paths.daemon_config(daemon)
        file_values = _read_toml(path)
        env_prefix = f"ZLAYER_{daemon.upper()}_"
        try:
            return cls(_env_prefix=env_prefix, **file_values)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ConfigError(
                f"{path}: `{key}`: {first['msg']}; fix the file or the "
                f"{env_prefix}{key.upper()} environment variable"
            ) from None


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
