"""The REST API in tests: a real zlayer-apid on a private bus, and tokens for it.

    with running_apid(private_bus, zlayer_prefix) as apid:
        token = mint_token(private_bus.address)            # an admin token, over the bus
        status, body = apid.call("GET", "/api/v1/deployments", token)

``mint_token`` asks apid's CreateToken over the bus, as ``zlayerctl token
create`` does, so a test needs no token store of its own. ``running_apid``
starts apid (through tests/daemon_process.py: stopped by its PID whatever
happens) with the settings given, waits until it listens and tells its URL.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

from shared.bus import open_bus
from shared.busdaemon import PrivateBus
from shared.clients import ApiClient
from shared.paths import Paths
from shared.wire.api import TokenCreate
from tests.daemon_process import daemon_process

REST_API = re.compile(r"REST API on (\S+):(\d+)")


@dataclass
class Apid:
    """A running zlayer-apid: its process, its log file and its base URL."""

    process: Popen[bytes]
    log: Path
    url: str

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, the JSON body or None, headers) of one request; never raises for a status."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, _json(reply.read()), dict(reply.headers)
        except urllib.error.HTTPError as error:
            return error.code, _json(error.read()), dict(error.headers)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


@contextmanager
def running_apid(bus: PrivateBus, paths: Paths, settings: str = "") -> Iterator[Apid]:
    """zlayer-apid on ``bus`` with ``settings`` (TOML lines) added to its config."""
    config = paths.daemon_config("apid")
    config.write_text(config.read_text() + settings)
    with daemon_process("apid", bus, paths) as (process, log):
        deadline = time.monotonic() + 30
        announced = None
        while announced is None:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "zlayer-apid did not listen within 30 s"
            time.sleep(0.05)
            announced = REST_API.search(log.read_text())
        yield Apid(process, log, f"http://{announced.group(1)}:{announced.group(2)}")


def mint_token(
    bus_address: str,
    name: str = "test-admin",
    role: str = "admin",
    deployments: tuple[str, ...] = (),
    ttl_seconds: int | None = None,
) -> str:
    """A token from the apid on ``bus_address`` (admin, every deployment, unless told)."""

    async def create() -> str:
        bus = open_bus(bus_address)
        try:
            issued = await ApiClient(bus).create_token(
                TokenCreate(
                    name=name,
                    role=role,  # type: ignore[arg-type]  # the caller's to get right
                    deployments=list(deployments),
                    ttl_seconds=ttl_seconds,
                )
            )
        finally:
            bus.close()
        return issued.token

    return asyncio.run(create())


def revoke_token(bus_address: str, name: str) -> None:
    async def revoke() -> None:
        bus = open_bus(bus_address)
        try:
            await ApiClient(bus).revoke_token(name)
        finally:
            bus.close()

    asyncio.run(revoke())
