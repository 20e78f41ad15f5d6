"""Entry point and bus object of zlayer-proxyd."""

from __future__ import annotations

from shared.bus import DAEMONS_BY_NAME, Proxy1
from shared.daemon import Daemon, daemon_members, main_for


class ProxyService(Proxy1):
    version, status = daemon_members()

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon


class ProxyDaemon(Daemon):
    info = DAEMONS_BY_NAME["proxyd"]

    def make_service(self) -> ProxyService:
        return ProxyService(self)


def main() -> None:
    main_for(ProxyDaemon)
