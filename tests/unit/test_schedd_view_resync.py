"""Which views schedd sends at once when a view holder asks for a resync (it started)."""

from __future__ import annotations

import asyncio

from daemons.schedd.store import StoreThread
from daemons.schedd.views import ViewSync
from shared.wire.agent import NodeAssignments, SyncResult
from shared.wire.traffic import TrafficViews


class _Store:
    recovered = False
    stored_generation = 0

    def names(self) -> list[str]:
        return []

    def generation(self) -> int:
        return self.stored_generation

    def next_generation(self, at_least: int) -> int:
        self.stored_generation = max(self.stored_generation, at_least)
        return self.stored_generation


class _Holder:
    """A view holder that takes every view and counts them."""

    def __init__(self) -> None:
        self.views = 0

    async def sync_assignments(self, view: NodeAssignments) -> SyncResult:
        self.views += 1
        return SyncResult(generation=view.generation, accepted=True)

    async def sync_traffic(self, view: TrafficViews) -> SyncResult:
        self.views += 1
        return SyncResult(generation=view.generation, accepted=True)


class _Cache:
    def invalidate(self, reason: str) -> None:
        pass


def _sent_after_resync(daemon: str) -> dict[str, int]:
    holders = {"agentd": _Holder(), "overlayd": _Holder(), "proxyd": _Holder()}
    views = ViewSync(
        _Store(),  # type: ignore[arg-type]
        StoreThread(),
        holders["agentd"],  # type: ignore[arg-type]
        holders["overlayd"],  # type: ignore[arg-type]
        holders["proxyd"],  # type: ignore[arg-type]
        _Cache(),  # type: ignore[arg-type]
        lambda *args: None,
        lambda: None,
    )

    async def run() -> None:
        await views.sync([], {})  # every holder's first view
        for holder in holders.values():
            holder.views = 0
        await views.sync([], {})  # nothing changed, nothing due
        views.resync(daemon)
        await views.sync([], {})

    asyncio.run(run())
    return {name: holder.views for name, holder in holders.items()}


def test_a_restarted_overlayd_gets_its_view_and_agentd_one_too() -> None:
    """agentd releases the networks it could not while overlayd was away when it takes a
    view, so a restarted overlayd's resync sends agentd one as well."""
    assert _sent_after_resync("overlayd") == {"agentd": 1, "overlayd": 1, "proxyd": 0}


def test_a_restarted_proxyd_gets_only_its_own_view() -> None:
    assert _sent_after_resync("proxyd") == {"agentd": 0, "overlayd": 0, "proxyd": 1}
