"""Turning exceptions into one plain sentence a person can act on."""

from __future__ import annotations

import sdbus

from shared.bus import ZLayerError

NOT_RUNNING = (
    "the ZLayer daemons are not running; start them with `zlayerctl daemon run --detach` "
    "(or `systemctl start zlayer.target` on a systemd host)"
)


def explain(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, ZLayerError):
        return str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, sdbus.DbusServiceUnknownError | sdbus.DbusNameHasNoOwnerError):
        return _not_on_the_bus(str(exc))
    if isinstance(exc, sdbus.SdBusLibraryError):
        return NOT_RUNNING
    if isinstance(exc, sdbus.DbusNoReplyError | sdbus.DbusTimeoutError):
        return "a ZLayer daemon did not answer in time; check `zlayerctl status`"
    if isinstance(exc, sdbus.DbusAccessDeniedError):
        return "permission denied on the ZLayer bus; run zlayerctl as root"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc) or type(exc).__name__
    return f"unexpected error: {text} (set ZLAYER_DEBUG=1 to see where)"


def _not_on_the_bus(message: str) -> str:
    """One daemon is missing from a bus that answers: it may be restarting, or stopped."""
    from shared.bus import DAEMONS

    missing = next((d for d in DAEMONS if d.bus_name in message), None)
    if missing is None:
        return NOT_RUNNING
    return (
        f"{missing.executable} is not on the bus (it may be restarting); "
        "`zlayerctl status` shows which daemons run, and `zlayerctl daemon run --detach` "
        "(or `systemctl start zlayer.target`) starts them"
    )
