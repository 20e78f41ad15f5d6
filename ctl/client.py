"""zlayerctl's connection to the daemons, and finding what a command is about.

Commands run one ``asyncio.run(...)`` each; inside it they make a
``Client()`` and call the typed clients of the daemons on its bus
(``client.scheduler``, ``client.agent``, ... from ``shared.clients``).
Failures surface as exceptions that ``ctl.main`` turns into one sentence.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from sdbus import DbusInterfaceCommonAsync

from ctl.errors import NOT_RUNNING
from ctl.output import fail
from shared.bus import open_bus, resolve_bus_address
from shared.clients import (
    AgentClient,
    DaemonClient,
    OverlayClient,
    ProxyClient,
    RegistryClient,
    SchedulerClient,
    daemon_client,
)
from shared.paths import Paths

LONG_CALL_USEC = 10 * 60 * 1_000_000  # imports and teardowns may take minutes


class Client:
    """One bus connection and typed clients of the daemons on it, each made once."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env()
        address = resolve_bus_address(self.paths)
        try:
            self.bus = open_bus(address)
        except Exception:  # no system bus and no private bus
            fail(NOT_RUNNING, 1)
        self.bus.method_call_timeout_usec = LONG_CALL_USEC
        self._daemons: dict[str, DaemonClient[DbusInterfaceCommonAsync]] = {}

    def daemon(self, name: str) -> DaemonClient[DbusInterfaceCommonAsync]:
        """Any daemon by short name, for what every daemon answers (status, ping)."""
        found = self._daemons.get(name)
        if found is None:
            found = self._daemons[name] = daemon_client(name, self.bus)
        return found

    @cached_property
    def scheduler(self) -> SchedulerClient:
        return SchedulerClient(self.bus)

    @cached_property
    def agent(self) -> AgentClient:
        return AgentClient(self.bus)

    @cached_property
    def registry(self) -> RegistryClient:
        return RegistryClient(self.bus)

    @cached_property
    def overlay(self) -> OverlayClient:
        return OverlayClient(self.bus)

    @cached_property
    def proxy(self) -> ProxyClient:
        return ProxyClient(self.bus)

    def close(self) -> None:
        self.bus.close()


async def deployment_names(client: Client) -> list[str]:
    return [d.name for d in await client.scheduler.list_deployments()]


async def resolve_deployment(client: Client, name: str | None) -> str:
    """The deployment a command means: named, the spec's in this directory, or the only one."""
    if name:
        return name
    from ctl.spec_cmd import SPEC_PATTERNS

    here = Path(os.getcwd())
    found = sorted({p for pattern in SPEC_PATTERNS for p in here.glob(pattern) if p.is_file()})
    if len(found) == 1:
        from shared.spec import SpecError, load_spec

        try:
            return load_spec(found[0]).deployment
        except SpecError:
            pass
    names = await deployment_names(client)
    if len(names) == 1:
        return names[0]
    if not names:
        fail("there are no deployments; start one with `zlayerctl up FILE`")
    fail(f"several deployments exist ({', '.join(names)}); name one with -d DEPLOYMENT")
