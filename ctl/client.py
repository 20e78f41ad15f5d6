"""zlayerctl's connection to the daemons, and finding what a command is about.

Commands run one ``asyncio.run(...)`` each; inside it they ``connect()`` and
call ``schedd()``/``agentd()``/... proxies. Failures surface as exceptions
that ``ctl.main`` turns into one sentence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ctl.errors import NOT_RUNNING
from ctl.output import fail
from shared.bus import DAEMONS_BY_NAME, open_bus, proxy, resolve_bus_address
from shared.paths import Paths

LONG_CALL_USEC = 10 * 60 * 1_000_000  # imports and teardowns may take minutes


class Client:
    """One bus connection and proxies of the daemons on it."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env()
        address = resolve_bus_address(self.paths)
        try:
            self.bus = open_bus(address)
        except Exception:  # no system bus and no private bus
            fail(NOT_RUNNING, 1)
        self.bus.method_call_timeout_usec = LONG_CALL_USEC

    def daemon(self, name: str) -> Any:
        return proxy(DAEMONS_BY_NAME[name], self.bus)

    @property
    def schedd(self) -> Any:
        return self.daemon("schedd")

    @property
    def agentd(self) -> Any:
        return self.daemon("agentd")

    @property
    def registryd(self) -> Any:
        return self.daemon("registryd")

    def close(self) -> None:
        self.bus.close()


async def deployment_names(client: Client) -> list[str]:
    raw = await client.schedd.list_deployments()
    return [d["name"] for d in json.loads(raw)]


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
