"""schedd's status of a deployment whose spec is not in its cache (schedd restarted, or
another schedd deployed it) parses the stored spec once and keeps it, as a deploy does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from daemons.schedd import scheduler as scheduler_module
from daemons.schedd.scheduler import Scheduler
from daemons.schedd.store import Store
from shared.spec import DeploymentSpec, parse_spec
from shared.wire.agent import ReplicaInfo

SPEC = """
version: v1
deployment: shop
services:
  web:
    image: zlayer/busybox
"""


class _NoBus:
    """A daemon's client that is never called: status() here asks no daemon."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus


@pytest.fixture
def no_daemon_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Scheduler made without a bus: its clients of the other daemons are never called."""
    for client in ("AgentClient", "OverlayClient", "ProxyClient"):
        monkeypatch.setattr(scheduler_module, client, _NoBus)


def test_a_spec_parsed_for_status_is_kept_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_daemon_clients: None
) -> None:
    parsed: list[str] = []
    real_validate = DeploymentSpec.model_validate_json

    def validate(text: str | bytes) -> DeploymentSpec:
        parsed.append("stored spec")
        return real_validate(text)

    monkeypatch.setattr(DeploymentSpec, "model_validate_json", validate)
    store = Store(tmp_path / "state.db")
    spec = parse_spec(SPEC, "shop.yml")
    revision = store.add_revision("shop", spec.model_dump_json(), SPEC, "shop.yml")

    async def no_replicas(name: str) -> list[ReplicaInfo]:
        return []

    async def run() -> None:
        scheduler = Scheduler(store, None, lambda event: None)  # type: ignore[arg-type]
        monkeypatch.setattr(scheduler, "_replicas", no_replicas)
        first = await scheduler.status("shop")
        second = await scheduler.status("shop")
        assert [s.name for s in first.services] == [s.name for s in second.services] == ["web"]
        assert scheduler._specs[("shop", revision)].services.keys() == {"web"}
        assert scheduler._spec("shop", revision) is scheduler._specs[("shop", revision)]

    try:
        asyncio.run(run())
    finally:
        store.close()
    assert parsed == ["stored spec"]  # once: the second status and the pass found it kept


def test_a_deployment_gone_between_the_listing_and_its_read_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_daemon_clients: None
) -> None:
    """``zlayerctl ps`` while a removal ends: the deployment listed, then gone before its
    status is read, is not in the answer, and the others are (no 'no deployment' error)."""
    store = Store(tmp_path / "state.db")
    spec = parse_spec(SPEC, "shop.yml")
    store.add_revision("shop", spec.model_dump_json(), SPEC, "shop.yml")
    listed = store.names

    def names_then_gone() -> list[str]:
        return ["gone", *listed()]  # "gone" was listed; its removal ended right after

    monkeypatch.setattr(store, "names", names_then_gone)

    async def no_replicas(name: str) -> list[ReplicaInfo]:
        return []

    async def run() -> list[str]:
        scheduler = Scheduler(store, None, lambda event: None)  # type: ignore[arg-type]
        monkeypatch.setattr(scheduler, "_replicas", no_replicas)
        return [status.name for status in await scheduler.list_status()]

    try:
        assert asyncio.run(run()) == ["shop"]
    finally:
        store.close()
