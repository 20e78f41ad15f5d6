"""Entry point and bus object of zlayer-agentd."""

from __future__ import annotations

from shared.bus import DAEMONS_BY_NAME, Agent1
from shared.daemon import Daemon, daemon_members, main_for


class AgentService(Agent1):
    version, status = daemon_members()

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon


class AgentDaemon(Daemon):
    info = DAEMONS_BY_NAME["agentd"]

    def make_service(self) -> AgentService:
        return AgentService(self)


def main() -> None:
    main_for(AgentDaemon)
