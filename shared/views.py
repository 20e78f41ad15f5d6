"""Full views and their generations: how a daemon holding a copy of the truth takes a new one.

schedd's store is the only desired state. agentd (assignments), overlayd and
proxyd (traffic) keep a cache of it, and schedd sends each of them the
*complete* view, stamped with a generation that only grows. A receiver:

- refuses a view older than the one it holds (:class:`HeldGeneration`), so a
  view computed before a ``down`` can never bring the deployment back;
- applies every deployment the view names and removes every one it holds
  that the view does not name (:func:`apply_views`), reporting per
  deployment what it could not apply instead of failing the whole view.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from shared.bus import InvalidArgumentError, ZLayerError
from shared.statefile import read_state, write_atomically
from shared.wire import WireError, decode
from shared.wire.agent import SyncResult
from shared.wire.traffic import DeploymentTraffic, TrafficViews

log = logging.getLogger("zlayer.views")

GENERATION_FILE = "generation"


class HeldGeneration:
    """The generation of the view a daemon holds, kept in its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / GENERATION_FILE
        # Unreadable: moved aside, and nothing is held, so schedd's next view is taken.
        held = read_state(self.path, int, "taking the next view schedd sends", log)
        self.value = held if held is not None else 0

    def accepts(self, generation: int) -> bool:
        """Whether a view of ``generation`` may replace the one held (not older)."""
        return generation >= self.value

    def hold(self, generation: int) -> None:
        """Remember ``generation`` durably."""
        if generation == self.value and self.path.exists():
            return
        write_atomically(self.path, f"{generation}\n")
        self.value = generation


def refused(held: HeldGeneration) -> SyncResult:
    """The answer to a view older than the one held."""
    return SyncResult(generation=held.value, accepted=False)


async def apply_views(
    views: TrafficViews,
    held_deployments: Iterable[str],
    apply_one: Callable[[str, DeploymentTraffic], Awaitable[None]],
) -> SyncResult:
    """Apply each deployment's traffic, then an empty view for each one no longer named.

    ``apply_one`` is the receiver's own per-deployment push (what
    ``SetTraffic`` does); a :class:`ZLayerError` from it is that
    deployment's refusal and the others still apply.
    """
    refusals: dict[str, str] = {}
    removed: list[tuple[str, str]] = []
    named = {view.deployment for view in views.deployments}
    for view in views.deployments:
        try:
            await apply_one(view.deployment, view)
        except ZLayerError as exc:
            refusals[view.deployment] = exc.args[0] if exc.args else str(exc)
    for gone in sorted(set(held_deployments) - named):
        try:
            await apply_one(gone, DeploymentTraffic(deployment=gone))
        except ZLayerError as exc:  # pragma: no cover - removing never conflicts
            refusals[gone] = exc.args[0] if exc.args else str(exc)
            continue
        removed.append((gone, f"removed the traffic of {gone}: the deployment no longer exists"))
    return SyncResult(
        generation=views.generation, accepted=True, refusals=refusals, removed=removed
    )


class TrafficHolder:
    """A traffic daemon's side of ``SyncTraffic`` (overlayd, proxyd): one sync at a time,
    the generation it holds, and its log lines."""

    def __init__(self, state_dir: Path, daemon_log: logging.Logger) -> None:
        self.held = HeldGeneration(state_dir)
        self.log = daemon_log
        self._lock = asyncio.Lock()

    async def sync(
        self,
        text: str,
        held_deployments: Callable[[], Iterable[str]],
        apply_one: Callable[[str, DeploymentTraffic], Awaitable[None]],
    ) -> SyncResult:
        """Apply the views in ``text`` (a TrafficViews) unless they are older than held."""
        try:
            views = decode(text, TrafficViews)
        except WireError as exc:
            raise InvalidArgumentError(f"the traffic views are {exc}") from None
        async with self._lock:
            if not self.held.accepts(views.generation):
                self.log.info(
                    "ignored traffic views of generation %d: generation %d is newer",
                    views.generation,
                    self.held.value,
                )
                return refused(self.held)
            result = await apply_views(views, list(held_deployments()), apply_one)
            await asyncio.to_thread(self.held.hold, views.generation)
        for deployment, sentence in result.refusals.items():
            self.log.warning("traffic of %s refused: %s", deployment, sentence)
        for _deployment, sentence in result.removed:
            self.log.info("%s", sentence)
        return result
