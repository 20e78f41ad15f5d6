"""Entry point and bus object of zlayer-registryd."""

from __future__ import annotations

from shared.bus import DAEMONS_BY_NAME, Registry1
from shared.daemon import Daemon, daemon_members, main_for


class RegistryService(Registry1):
    version, status = daemon_members()

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon


class RegistryDaemon(Daemon):
    info = DAEMONS_BY_NAME["registryd"]

    def make_service(self) -> RegistryService:
        return RegistryService(self)


def main() -> None:
    main_for(RegistryDaemon)
