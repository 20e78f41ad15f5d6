"""The D-Bus contract between the daemons and zlayerctl.

One definition serves both sides: a daemon subclasses its interface here and
overrides the members (``dbus_method_async_override``), and zlayerctl makes
a proxy of the same class. Every interface carries ``Version`` and
``Status``; later capabilities add their own members.

Errors cross the bus as named D-Bus errors (``org.zlayer.Error.NotFound``
...). Raising a :class:`ZLayerError` subclass in a daemon delivers that name
and its sentence; the caller's proxy raises the same class again.

The generated introspection XML of these interfaces is checked in under
``units/dbus/``; regenerate it with ``python -m shared.introspect``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import sdbus
from pydantic import BaseModel, ConfigDict
from sdbus import (
    DbusFailedError,
    DbusInterfaceCommonAsync,
    DbusPropertyConstFlag,
    DbusUnprivilegedFlag,
    dbus_method_async,
    dbus_property_async,
)

from shared.paths import Paths

BUS_ADDRESS_ENV = "ZLAYER_BUS_ADDRESS"
ERROR_PREFIX = "org.zlayer.Error."

# ---------------------------------------------------------------- errors


class ZLayerError(DbusFailedError):
    """Base of every ZLayer bus error; its message is a sentence for a person."""

    dbus_error_name = ERROR_PREFIX + "Failed"


class NotFoundError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "NotFound"


class InvalidSpecError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "InvalidSpec"


class InvalidArgumentError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "InvalidArgument"


class AlreadyExistsError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "AlreadyExists"


class ConflictError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "Conflict"


class UnavailableError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "Unavailable"


class NotSupportedError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "NotSupported"


ERRORS: tuple[type[ZLayerError], ...] = (
    ZLayerError,
    NotFoundError,
    InvalidSpecError,
    InvalidArgumentError,
    AlreadyExistsError,
    ConflictError,
    UnavailableError,
    NotSupportedError,
)

# ---------------------------------------------------------------- status

DaemonState = Literal["starting", "running", "degraded", "stopping"]
Supervisor = Literal["systemd", "zlayerctl", "none"]

STATUS_SIGNATURE = "(sssutsss)"
StatusTuple = tuple[str, str, str, int, int, str, str, str]


class DaemonStatus(BaseModel):
    """A daemon's health summary, as ``Status`` returns it."""

    model_config = ConfigDict(frozen=True)

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
        fields = (
            "name",
            "state",
            "version",
            "pid",
            "started_at_usec",
            "metrics_url",
            "supervisor",
            "detail",
        )
        return cls.model_validate(dict(zip(fields, value, strict=True)))


# ---------------------------------------------------------------- interfaces


def _daemon_members() -> tuple[Any, Any]:
    """Fresh ``Version`` and ``Status`` members for one interface class.

    sdbus binds a member to the interface of the class body it appears in, so
    each interface needs its own pair; this keeps their contract in one place.
    """

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def version(self: Any) -> str:
        """The daemon's version."""
        raise NotImplementedError

    @dbus_method_async(
        result_signature=STATUS_SIGNATURE,
        result_args_names=("status",),
        flags=DbusUnprivilegedFlag,
    )
    async def status(self: Any) -> StatusTuple:
        """(name, state, version, pid, started_at_usec, metrics_url, supervisor, detail)."""
        raise NotImplementedError

    return version, status


class Scheduler1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Scheduler1"):
    """zlayer-schedd: desired state, reconcile loop, placement, rollouts."""

    version, status = _daemon_members()


class Agent1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Agent1"):
    """zlayer-agentd: containers, health checks, jobs on this node."""

    version, status = _daemon_members()


class Registry1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Registry1"):
    """zlayer-registryd: images, blobs, layers, builds."""

    version, status = _daemon_members()


class Overlay1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Overlay1"):
    """zlayer-overlayd: bridge, IPAM, service DNS, port publishing, mesh."""

    version, status = _daemon_members()


class Proxy1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Proxy1"):
    """zlayer-proxyd: L4/L7 ingress and load balancing."""

    version, status = _daemon_members()


class Api1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Api1"):
    """zlayer-apid: the REST gateway onto the bus."""

    version, status = _daemon_members()


# ---------------------------------------------------------------- the daemons


@dataclass(frozen=True)
class DaemonInfo:
    """What the rest of the system needs to know about one daemon."""

    name: str  # short name: schedd
    bus_name: str  # also the interface name: org.zlayer.Scheduler1
    interface: type[DbusInterfaceCommonAsync]
    default_metrics_port: int

    @property
    def object_path(self) -> str:
        return "/" + self.bus_name.replace(".", "/")

    @property
    def executable(self) -> str:
        return f"zlayer-{self.name}"

    @property
    def unit(self) -> str:
        return f"zlayer-{self.name}.service"


DAEMONS: tuple[DaemonInfo, ...] = (
    DaemonInfo("schedd", "org.zlayer.Scheduler1", Scheduler1, 9301),
    DaemonInfo("agentd", "org.zlayer.Agent1", Agent1, 9302),
    DaemonInfo("registryd", "org.zlayer.Registry1", Registry1, 9303),
    DaemonInfo("overlayd", "org.zlayer.Overlay1", Overlay1, 9304),
    DaemonInfo("proxyd", "org.zlayer.Proxy1", Proxy1, 9305),
    DaemonInfo("apid", "org.zlayer.Api1", Api1, 9306),
)
DAEMONS_BY_NAME: dict[str, DaemonInfo] = {d.name: d for d in DAEMONS}


# ---------------------------------------------------------------- connecting


def resolve_bus_address(paths: Paths, environ: dict[str, str] | None = None) -> str | None:
    """The bus the daemons are on: an explicit address, the private bus, or None.

    None means the system bus, where the daemons run under systemd.
    """
    env = os.environ if environ is None else environ
    if env.get(BUS_ADDRESS_ENV):
        return env[BUS_ADDRESS_ENV]
    try:
        address = paths.bus_address_file.read_text().strip()
    except OSError:
        return None
    return address or None


def open_bus(address: str | None) -> sdbus.SdBus:
    """Open a bus connection: the given address, or the system bus for None."""
    if address is None:
        return sdbus.sd_bus_open_system()
    # sd-bus takes a custom address only through this variable; it is read at
    # open time, so setting it for our own process is enough.
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    return sdbus.sd_bus_open_system()


def proxy(info: DaemonInfo, bus: sdbus.SdBus) -> Any:
    """A client proxy for the daemon ``info`` on ``bus``."""
    make: Callable[..., Any] = info.interface.new_proxy
    return make(info.bus_name, info.object_path, bus)
