"""zlayerctl's connection to the daemons, and finding what a command is about.

Commands run one ``asyncio.run(...)`` each; inside it they make a
``Client()`` and call the typed clients of the daemons: on this node's bus
(``shared.clients``) or, with ``--host``, through a node's REST API
(``ctl.remote``).
Failures surface as exceptions that ``ctl.main`` turns into one sentence.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from sdbus import SdBus

from ctl.errors import NOT_RUNNING
from ctl.output import fail
from ctl.protocols import (
    AgentApi,
    DaemonApi,
    OverlayApi,
    ProxyApi,
    RegistryApi,
    SchedulerApi,
    TokensApi,
)
from shared.bus import open_bus, resolve_bus_address
from shared.clients import (
    AgentClient,
    ApiClient,
    DaemonClient,
    DaemonInterface,
    OverlayClient,
    ProxyClient,
    RegistryClient,
    SchedulerClient,
    daemon_client,
)
from shared.paths import Paths

LONG_CALL_USEC = 10 * 60 * 1_000_000  # imports and teardowns may take minutes


class Client:
    """What a command holds: the typed clients of the daemons, each made once.

    ``Client()`` makes a :class:`LocalClient` (the daemons' bus here) or, when
    ``--host``, ``ZLAYER_HOST`` or the current context names a node's API, a
    ``ctl.remote.RemoteClient`` with the same attributes over HTTP; commands
    call ``Client()`` and cannot tell them apart. Each attribute is typed by
    a Protocol (``ctl.protocols``) both kinds of client meet.
    """

    def __new__(cls, *_args: Any, **_kwargs: Any) -> Client:
        if cls is Client:
            from ctl.readargs import may_be_remote

            remote = None
            if may_be_remote():
                from ctl.contexts import TargetError, target

                try:
                    remote = target()
                except TargetError as exc:
                    fail(str(exc))
            if remote is None:
                cls = LocalClient
            else:
                from ctl.remote import RemoteClient

                cls = RemoteClient
        return object.__new__(cls)

    remote = False  # True for a node's API (ctl.remote.RemoteClient)

    def __init__(self, paths: Paths | None = None) -> None:
        pass

    def daemon(self, name: str) -> DaemonApi:
        """Any daemon by short name, for what every daemon answers (status, ping)."""
        raise NotImplementedError

    @property
    def bus(self) -> SdBus:
        """The bus connection itself, for commands that hand the daemons local files."""
        raise NotImplementedError

    @property
    def scheduler(self) -> SchedulerApi:
        raise NotImplementedError

    @property
    def agent(self) -> AgentApi:
        raise NotImplementedError

    @property
    def registry(self) -> RegistryApi:
        raise NotImplementedError

    @property
    def overlay(self) -> OverlayApi:
        raise NotImplementedError

    @property
    def api(self) -> TokensApi:
        """zlayer-apid's own calls (its tokens)."""
        raise NotImplementedError

    @property
    def proxy(self) -> ProxyApi:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalClient(Client):
    """One connection to this node's bus and typed clients of the daemons on it."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env()
        address = resolve_bus_address(self.paths)
        try:
            self._bus = open_bus(address)
        except Exception:  # no system bus and no private bus
            fail(NOT_RUNNING, 1)
        self._bus.method_call_timeout_usec = LONG_CALL_USEC
        self._daemons: dict[str, DaemonClient[DaemonInterface]] = {}

    @property
    def bus(self) -> SdBus:
        return self._bus

    def daemon(self, name: str) -> DaemonClient[DaemonInterface]:
        found = self._daemons.get(name)
        if found is None:
            found = self._daemons[name] = daemon_client(name, self._bus)
        return found

    @cached_property
    def scheduler(self) -> SchedulerClient:
        return SchedulerClient(self._bus)

    @cached_property
    def agent(self) -> AgentClient:
        return AgentClient(self._bus)

    @cached_property
    def registry(self) -> RegistryClient:
        return RegistryClient(self._bus)

    @cached_property
    def overlay(self) -> OverlayClient:
        return OverlayClient(self._bus)

    @cached_property
    def api(self) -> ApiClient:
        return ApiClient(self._bus)

    @cached_property
    def proxy(self) -> ProxyClient:
        return ProxyClient(self._bus)

    def close(self) -> None:
        self._bus.close()


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
