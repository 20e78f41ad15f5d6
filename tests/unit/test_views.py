"""Full views: generations that only grow, and a view that removes what it no longer names."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shared.bus import ConflictError
from shared.views import HeldGeneration, apply_views
from shared.wire.traffic import DeploymentTraffic, TrafficViews


def test_an_older_generation_is_refused_and_the_held_one_survives_a_restart(
    tmp_path: Path,
) -> None:
    held = HeldGeneration(tmp_path)
    assert held.value == 0 and held.accepts(1)
    held.hold(7)
    assert held.accepts(7) and held.accepts(8) and not held.accepts(6)
    again = HeldGeneration(tmp_path)
    assert again.value == 7 and not again.accepts(3)


def test_an_unreadable_generation_is_moved_aside_and_the_next_view_taken(tmp_path: Path) -> None:
    (tmp_path / "generation").write_text("garbage\n")
    held = HeldGeneration(tmp_path)
    assert held.value == 0 and held.accepts(1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("generation.corrupt-")]


def test_views_apply_each_deployment_remove_the_unnamed_and_report_refusals() -> None:
    applied: dict[str, DeploymentTraffic] = {}

    async def apply_one(deployment: str, view: DeploymentTraffic) -> None:
        if deployment == "clash":
            raise ConflictError("port 80 is taken")
        if view.services or deployment in applied:
            applied[deployment] = view

    held = ["old", "shop"]
    views = TrafficViews(
        generation=5,
        deployments=[DeploymentTraffic(deployment="shop"), DeploymentTraffic(deployment="clash")],
    )
    result = asyncio.run(apply_views(views, held, apply_one))
    assert result.accepted and result.generation == 5
    assert result.refusals == {"clash": "port 80 is taken"}
    assert [d for d, _ in result.removed] == ["old"]
    assert "no longer exists" in result.removed[0][1]
