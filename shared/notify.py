"""sd_notify: readiness, status text and watchdog pings to whoever supervises us.

systemd sets ``NOTIFY_SOCKET``; so does ``zlayerctl daemon run`` for its
children, so one protocol serves both supervisors. Without the variable every
call is a no-op.
"""

from __future__ import annotations

import os

from cysystemd.daemon import Notification, notify


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def ready(status: str = "") -> None:
    if enabled():
        notify(Notification.READY)
        if status:
            notify(Notification.STATUS, status)


def stopping() -> None:
    if enabled():
        notify(Notification.STOPPING)


def status(text: str) -> None:
    if enabled():
        notify(Notification.STATUS, text)


def watchdog_ping() -> None:
    if enabled():
        notify(Notification.WATCHDOG)


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half the supervisor's timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not enabled():
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000
