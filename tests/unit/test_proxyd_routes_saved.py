"""proxyd's saved pushes: schedd sends every deployment with each view, and only a
deployment whose traffic changed is written again (each write is an fsync)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemons.proxyd.routes import Routes


def traffic(deployment: str, addresses: list[str]) -> str:
    services: list[dict[str, Any]] = [
        {
            "deployment": deployment,
            "service": "web",
            "endpoints": [{"name": "http", "protocol": "http", "port": 8080, "expose": "public"}],
            "backends": [
                {"replica": f"web-{i}", "instance": i, "revision": 1, "address": a}
                for i, a in enumerate(addresses, 1)
            ],
        }
    ]
    return json.dumps({"deployment": deployment, "services": services})


def push(routes: Routes, deployment: str, addresses: list[str]) -> None:
    parsed = Routes.parse(deployment, traffic(deployment, addresses))
    routes.apply(parsed)
    routes.save(parsed)


def written(path: Path) -> tuple[int, int]:
    """A file replaced by write-and-rename gets a new inode."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_an_unchanged_push_is_not_written_again_and_a_changed_one_is(tmp_path: Path) -> None:
    routes = Routes(tmp_path)
    push(routes, "d", ["10.0.0.1"])
    saved = tmp_path / "traffic" / "d.json"
    first = written(saved)
    table = routes.table
    push(routes, "d", ["10.0.0.1"])
    assert written(saved) == first
    assert routes.table is table  # nothing to rebuild either
    push(routes, "d", ["10.0.0.1", "10.0.0.2"])
    assert written(saved) != first
    (route,) = routes.table.l7
    assert [b.key for b in route.backends] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    again = Routes(tmp_path)
    again.load()
    assert [b.key for b in again.table.l7[0].backends] == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_a_loaded_push_is_not_rewritten_and_a_removed_one_comes_back(tmp_path: Path) -> None:
    push(Routes(tmp_path), "d", ["10.0.0.1"])
    saved = tmp_path / "traffic" / "d.json"
    first = written(saved)
    routes = Routes(tmp_path)
    routes.load()
    push(routes, "d", ["10.0.0.1"])
    assert written(saved) == first
    gone = Routes.parse("d", json.dumps({"deployment": "d", "services": []}))
    routes.apply(gone)
    routes.save(gone)
    assert not saved.exists() and routes.table.l7 == []
    push(routes, "d", ["10.0.0.1"])
    assert saved.exists() and len(routes.table.l7) == 1
