"""schedd's events reach its store in its order, those made while the store's thread was
busy in one write (one transaction, one fsync), before any later read of events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from daemons.schedd.scheduler import Scheduler
from daemons.schedd.store import Store
from shared.wire.scheduler import Event
from tests.unit.test_schedd_status_spec import (
    no_daemon_clients as no_daemon_clients,  # the fixture, for this module
)


def test_events_made_while_the_store_is_busy_are_written_together_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_daemon_clients: None
) -> None:
    store = Store(tmp_path / "state.db")
    writes: list[int] = []
    add_events = store.add_events

    def counted(events: Sequence[Event]) -> None:
        writes.append(len(events))
        add_events(events)

    monkeypatch.setattr(store, "add_events", counted)
    busy = threading.Event()

    async def run() -> tuple[list[str], list[str]]:
        scheduler = Scheduler(store, None, lambda event: None)  # type: ignore[arg-type]
        scheduler.io.post(busy.wait, 10)  # the store's thread is on a long write
        for n in range(20):
            scheduler.event("shop", "k", f"event {n}")
        busy.set()
        first = [e.message for e in await scheduler.io.call(store.events, "shop", 100)]
        scheduler.event("shop", "k", "event 20")  # the thread is idle: written on its own
        second = [e.message for e in await scheduler.io.call(store.events, "shop", 100)]
        return first, second

    try:
        first, second = asyncio.run(run())
    finally:
        busy.set()
        store.close()
    assert first == [f"event {n}" for n in range(20)]
    assert second == [f"event {n}" for n in range(21)]
    assert writes == [20, 1]
