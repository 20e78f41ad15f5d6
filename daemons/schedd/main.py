"""Entry point and bus object of zlayer-schedd."""

from __future__ import annotations

from shared.bus import DAEMONS_BY_NAME, Scheduler1
from shared.daemon import Daemon, daemon_members, main_for


class SchedulerService(Scheduler1):
    version, status = daemon_members()

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon


class SchedulerDaemon(Daemon):
    info = DAEMONS_BY_NAME["schedd"]

    def make_service(self) -> SchedulerService:
        return SchedulerService(self)


def main() -> None:
    main_for(SchedulerDaemon)
