"""The scaffold every ZLayer daemon runs on.

A daemon subclasses :class:`Daemon`, names its :class:`~shared.bus.DaemonInfo`
and settings class, and builds the object it exports on the bus. The scaffold
does the rest, the same way for all six: configuration, logging, the bus
name, metrics, sd_notify readiness and watchdog, bus liveness and a graceful
SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import sdbus
from sdbus import DbusInterfaceCommonAsync, dbus_method_async_override, dbus_property_async_override

from shared import __version__, notify
from shared.bus import DaemonInfo, open_bus, resolve_bus_address
from shared.clients import DaemonClient, DaemonInterface, SchedulerClient
from shared.config import ConfigError, DaemonSettings
from shared.logs import setup_logging, under_systemd, write_logs_off_the_loop
from shared.metrics import LOG_RECORDS_DROPPED, serve_metrics
from shared.paths import Paths
from shared.wire.daemon import DaemonState, DaemonStatus, StatusTuple, Supervisor

SUPERVISOR_ENV = "ZLAYER_SUPERVISOR_PID"
# glibc's malloc arenas for a daemon, set in its environment by the units and the
# supervisor: by default each thread that allocates gets an arena of its own (up to
# 8 per core), and an idle daemon's worker threads kept up to 2 MiB in them.
MALLOC_ARENA_MAX = "2"
# The daemons whose bytecode leaves out docstrings and asserts (python -OO, as
# PYTHONOPTIMIZE in their environment, set by the units and the supervisor): each
# holds 1.1-1.8 MiB less when idle. Not apid: its OpenAPI document describes the wire
# types with their docstrings. The daemons' asserts only narrow types for mypy.
PYTHON_OPTIMIZE = "2"
OPTIMIZED_DAEMONS = frozenset({"schedd", "agentd", "registryd", "overlayd", "proxyd"})
EX_CONFIG = 78  # sysexits.h: the configuration is wrong; restarting will not help
BUS_LIVENESS_INTERVAL = 5.0
RESYNC_ASK_TIMEOUT = 5.0

log = logging.getLogger("zlayer.daemon")


def daemon_members() -> tuple[Any, Any]:
    """``Version`` and ``Status`` implementations for a daemon's service class.

    Use in the class body: ``version, status = daemon_members()``; the class
    must have a ``daemon`` attribute pointing at its :class:`Daemon`.
    """

    @dbus_property_async_override()
    def version(self: Any) -> str:
        return __version__

    @dbus_method_async_override()
    async def status(self: Any) -> StatusTuple:
        current: DaemonStatus = self.daemon.status()
        return current.to_dbus()

    return version, status


class Daemon(ABC):
    """One ZLayer daemon process."""

    info: ClassVar[DaemonInfo]
    settings_class: ClassVar[type[DaemonSettings]] = DaemonSettings
    # Daemons that hold a copy of schedd's view (agentd, overlayd, proxyd) ask
    # schedd for the complete view once they serve, instead of waiting for
    # its next periodic resync.
    holds_view: ClassVar[bool] = False

    def __init__(self, settings: DaemonSettings, paths: Paths) -> None:
        self.settings = settings
        self.paths = paths
        self.log = logging.getLogger(f"zlayer.{self.info.name}")
        self.state: DaemonState = "starting"
        self.detail = ""
        self.started_at_usec = time.time_ns() // 1000
        self.metrics_port = 0
        self.bus: sdbus.SdBus | None = None
        self._stop = asyncio.Event()
        self._reloads: set[asyncio.Task[None]] = set()  # kept referenced until done

    # ------------------------------------------------------------ hooks

    @abstractmethod
    def make_service(self) -> DbusInterfaceCommonAsync:
        """The object exported at ``info.object_path``."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start daemon-specific work; called once the bus name is held."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop daemon-specific work; called on SIGTERM."""

    # ------------------------------------------------------------ status

    def status(self) -> DaemonStatus:
        bind = self.settings.metrics_bind
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        return DaemonStatus(
            name=self.info.name,
            state=self.state,
            version=__version__,
            pid=os.getpid(),
            started_at_usec=self.started_at_usec,
            metrics_url=f"http://{host}:{self.metrics_port}/metrics" if self.metrics_port else "",
            supervisor=self.supervisor(),
            detail=self.detail,
        )

    @property
    def wanted_metrics_port(self) -> int:
        port = self.settings.metrics_port
        return self.info.default_metrics_port if port is None else port

    @staticmethod
    def supervisor() -> Supervisor:
        if under_systemd():
            return "systemd"
        if os.environ.get(SUPERVISOR_ENV):
            return "zlayerctl"
        return "none"

    def request_stop(self) -> None:
        self._stop.set()

    def _request_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """SIGHUP (``systemctl reload``): re-read what can change while running.

        Most daemons have nothing of the kind and only say so; proxyd reads
        its TLS certificates again.
        """
        self.log.info("nothing to reload; restart the daemon to apply new settings")

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)

        address = resolve_bus_address(self.paths)
        try:
            self.bus = open_bus(address)
        except Exception as exc:  # sdbus raises its own library errors
            where = address or "the system bus"
            self.log.error("cannot connect to %s (%s); is dbus-daemon running?", where, exc)
            return 1
        sdbus.set_default_bus(self.bus)
        service = self.make_service()
        service.export_to_dbus(self.info.object_path, self.bus)
        try:
            await self.bus.request_name_async(self.info.bus_name, 0)
        except sdbus.SdBusBaseError as exc:
            self.log.error(
                "cannot take the bus name %s (%s); is another %s running?",
                self.info.bus_name,
                exc,
                self.info.executable,
            )
            return 1

        try:
            self.metrics_port = serve_metrics(
                self.info.name, __version__, self.settings.metrics_bind, self.wanted_metrics_port
            )
        except OSError as exc:
            self.log.error(
                "cannot serve metrics on %s:%d (%s); set metrics_port in %s",
                self.settings.metrics_bind,
                self.wanted_metrics_port,
                exc.strerror,
                self.paths.daemon_config(self.info.name),
            )
            return 1

        await self.start()
        self.state = "running"
        notify.ready(f"serving {self.info.bus_name}")
        if self.holds_view:
            self._ask_resync()
        self.log.info(
            "ready on %s, metrics on port %d", address or "the system bus", self.metrics_port
        )

        tasks = [asyncio.create_task(self._bus_liveness(), name="bus-liveness")]
        interval = notify.watchdog_interval()
        if interval and self.settings.watchdog:
            tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        stop_wait = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        if stop_wait not in done:
            exit_code = 1  # a background task ended: the bus is gone
        self.state = "stopping"
        notify.stopping()
        self.log.info("stopping")
        for task in [stop_wait, *tasks]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.stop()
        self.bus.close()
        return exit_code

    def _ask_resync(self) -> None:
        async def ask() -> None:
            assert self.bus is not None
            scheduler = SchedulerClient(self.bus)
            try:
                await asyncio.wait_for(scheduler.resync(self.info.name), RESYNC_ASK_TIMEOUT)
            except Exception as exc:  # schedd not up yet: it sends every view when it starts
                self.log.debug("could not ask schedd for a resync: %s", exc)

        task = asyncio.get_running_loop().create_task(ask(), name="ask-resync")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify.watchdog_ping()
            await asyncio.sleep(interval)

    async def _bus_liveness(self) -> None:
        """Return when the bus stops answering, so the supervisor restarts us."""
        own: DaemonClient[DaemonInterface] | None = (
            DaemonClient(self.info, self.bus) if self.bus else None
        )
        while own is not None:
            await asyncio.sleep(BUS_LIVENESS_INTERVAL)
            try:
                await asyncio.wait_for(own.ping(), timeout=BUS_LIVENESS_INTERVAL)
            except Exception as exc:  # any failure means the bus is unusable
                self.log.error("lost the bus (%s); exiting so the supervisor restarts us", exc)
                return


def main_for(daemon_class: type[Daemon]) -> None:
    """Console-script entry point: configure, run, exit with the daemon's code."""
    # A crash in a C extension (sd-bus) prints the Python stacks to stderr, the journal.
    faulthandler.enable()
    paths = Paths.from_env()
    identifier = daemon_class.info.executable
    try:
        settings = daemon_class.settings_class.load(daemon_class.info.name, paths)
    except ConfigError as exc:
        setup_logging(identifier)
        logging.getLogger("zlayer.daemon").error("%s", exc)
        sys.exit(EX_CONFIG)
    setup_logging(identifier, settings.log_level)
    stop_log_writer = write_logs_off_the_loop(LOG_RECORDS_DROPPED.inc)

    import uvloop

    try:
        daemon = daemon_class(settings, paths)
        code = uvloop.run(daemon.run())
    finally:
        stop_log_writer()  # what is queued is written before the process ends
    sys.exit(code)
