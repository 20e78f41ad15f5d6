"""Entry point and bus object of zlayer-overlayd."""

from __future__ import annotations

from shared.bus import DAEMONS_BY_NAME, Overlay1
from shared.daemon import Daemon, daemon_members, main_for


class OverlayService(Overlay1):
    version, status = daemon_members()

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon


class OverlayDaemon(Daemon):
    info = DAEMONS_BY_NAME["overlayd"]

    def make_service(self) -> OverlayService:
        return OverlayService(self)


def main() -> None:
    main_for(OverlayDaemon)
