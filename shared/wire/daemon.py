"""What every interface answers: ``Status`` (a daemon's health summary)."""

from __future__ import annotations

from typing import Literal

from shared.wire import Wire

DaemonState = Literal["starting", "running", "degraded", "stopping"]
Supervisor = Literal["systemd", "zlayerctl", "none"]

STATUS_SIGNATURE = "(sssutsss)"
StatusTuple = tuple[str, str, str, int, int, str, str, str]


class DaemonStatus(Wire, frozen=True):
    """A daemon's health summary, as ``Status`` returns it (a D-Bus struct, not JSON)."""

    name: str
    state: DaemonState
    version: str
    pid: int
    started_at_usec: int
    metrics_url: str
    supervisor: Supervisor
    detail: str = ""

    def to_dbus(self) -> StatusTuple:
        return (
            self.name,
            self.state,
            self.version,
            self.pid,
            self.started_at_usec,
            self.metrics_url,
            self.supervisor,
            self.detail,
        )

    @classmethod
    def from_dbus(cls, value: StatusTuple) -> DaemonStatus:
        name, state, version, pid, started_at_usec, metrics_url, supervisor, detail = value
        return cls(
            name=name,
            state=state,  # type: ignore[arg-type]  # checked by the daemon that sent it
            version=version,
            pid=pid,
            started_at_usec=started_at_usec,
            metrics_url=metrics_url,
            supervisor=supervisor,  # type: ignore[arg-type]
            detail=detail,
        )
