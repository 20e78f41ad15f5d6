"""Where ZLayer keeps configuration, state, runtime files and logs.

One prefix moves all of them, so tests and development never touch system
paths: with ``ZLAYER_PREFIX=/tmp/x`` configuration lives in
``/tmp/x/etc/zlayer`` instead of ``/etc/zlayer``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PREFIX_ENV = "ZLAYER_PREFIX"


@dataclass(frozen=True)
class Paths:
    """The directories of one ZLayer installation."""

    prefix: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Paths:
        env = os.environ if environ is None else environ
        return cls(Path(env.get(PREFIX_ENV) or "/"))

    @property
    def config_dir(self) -> Path:
        return self.prefix / "etc" / "zlayer"

    @property
    def state_dir(self) -> Path:
        return self.prefix / "var" / "lib" / "zlayer"

    @property
    def run_dir(self) -> Path:
        return self.prefix / "run" / "zlayer"

    @property
    def log_dir(self) -> Path:
        return self.prefix / "var" / "log" / "zlayer"

    def daemon_config(self, daemon: str) -> Path:
        """``/etc/zlayer/<daemon>.toml``."""
        return self.config_dir / f"{daemon}.toml"

    def daemon_state(self, daemon: str) -> Path:
        """``/var/lib/zlayer/<daemon>/``: the daemon's own persisted state."""
        return self.state_dir / daemon

    @property
    def bus_socket(self) -> Path:
        """The private bus socket that ``zlayerctl daemon run`` listens on."""
        return self.run_dir / "bus.sock"

    @property
    def bus_address_file(self) -> Path:
        """Holds the private bus address while the built-in supervisor runs."""
        return self.run_dir / "bus.address"

    @property
    def supervisor_state(self) -> Path:
        """The built-in supervisor's pid and children, as JSON."""
        return self.run_dir / "supervisor.json"
