"""Turning exceptions into one plain sentence a person can act on.

The read commands meet the bus through ``shared.busread`` (its BusError
carries the D-Bus error's name), every other command through sdbus; both
give the same sentence for the same error. sdbus is imported here only when
the exception may be one of its own (it was imported already).
"""

from __future__ import annotations

import sys

from shared.busread import BUS_NAMES, NO_REPLY, ZLAYER_ERRORS, BusError, NoBusError

NOT_RUNNING = (
    "the ZLayer daemons are not running; start them with `zlayerctl daemon run --detach` "
    "(or `systemctl start zlayer.target` on a systemd host)"
)
_NOT_ON_THE_BUS = frozenset(
    {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
)
_NO_ANSWER = frozenset({NO_REPLY, "org.freedesktop.DBus.Error.Timeout"})
_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


def explain(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, BusError):
        return _bus_error(exc.name, exc.message)
    if isinstance(exc, NoBusError):
        return NOT_RUNNING
    if "sdbus" in sys.modules:
        import sdbus

        from shared.bus import ZLayerError

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
    return _unexpected(str(exc) or type(exc).__name__)


def _unexpected(text: str) -> str:
    return f"unexpected error: {text} (set ZLAYER_DEBUG=1 to see where)"


def _bus_error(name: str, message: str) -> str:
    """The sentence for an error reply named ``name``, as for the exception sdbus raises for it."""
    if name in ZLAYER_ERRORS:
        return message
    if name in _NOT_ON_THE_BUS:
        return _not_on_the_bus(message)
    if name in _NO_ANSWER:
        return "a ZLayer daemon did not answer in time; check `zlayerctl status`"
    if name == _ACCESS_DENIED:
        return "permission denied on the ZLayer bus; run zlayerctl as root"
    return explain(_as_sdbus_raises_it(name, message))


def _as_sdbus_raises_it(name: str, message: str) -> BaseException:
    """The exception sdbus raises for an error reply: the class it maps ``name`` to, made
    with the message alone, or SdBusUnmappedMessageError(name, message). Imports sdbus, on
    this rare path only (an error no read command expects)."""
    import sdbus
    from sdbus.sd_bus_internals import DBUS_ERROR_TO_EXCEPTION

    import shared.bus  # noqa: F401  # maps the org.zlayer.Error names, as in any client

    mapped = DBUS_ERROR_TO_EXCEPTION.get(name)
    if mapped is not None:
        try:
            made: BaseException = mapped(message)
        except Exception:  # a class that wants more than a message
            pass
        else:
            return made
    return sdbus.SdBusUnmappedMessageError(name, message)


def _not_on_the_bus(message: str) -> str:
    """One daemon is missing from a bus that answers: it may be restarting, or stopped."""
    missing = next((d for d, bus_name in BUS_NAMES.items() if bus_name in message), None)
    if missing is None:
        return NOT_RUNNING
    return (
        f"zlayer-{missing} is not on the bus (it may be restarting); "
        "`zlayerctl status` shows which daemons run, and `zlayerctl daemon run --detach` "
        "(or `systemctl start zlayer.target`) starts them"
    )
