"""`ps --containers` names each replica's node in a cluster, and has no NODE column alone."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from ctl import reads
from shared.wire.agent import ReplicaInfo


def replica(rid: str, node: str) -> ReplicaInfo:
    return ReplicaInfo(
        id=rid,
        deployment="app",
        service="web",
        instance=int(rid.split("-")[2]),
        revision=1,
        image="busybox",
        state="running",
        node=node,
    )


class Listing:
    """What the daemons answer: the replicas given."""

    def __init__(self, replicas: list[ReplicaInfo]) -> None:
        self.replicas = replicas

    def list_replicas(self, deployment: str, service: str) -> list[ReplicaInfo]:
        return self.replicas


def answered(monkeypatch: pytest.MonkeyPatch, replicas: list[ReplicaInfo]) -> None:
    @contextlib.contextmanager
    def reader() -> Iterator[Any]:
        yield Listing(replicas)

    monkeypatch.setattr(reads, "reader", reader)


def test_a_cluster_shows_each_replicas_node(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answered(monkeypatch, [replica("app-web-1-r1", "n1-a1"), replica("app-web-2-r1", "n2-b2")])
    reads.ps(True, None, "table")
    out = capsys.readouterr().out
    assert out.split()[0] == "NODE"
    rows = {line.split()[1]: line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    assert rows == {"app-web-1-r1": "n1-a1", "app-web-2-r1": "n2-b2"}
    reads.ps(True, None, "json")
    assert [r["node"] for r in json.loads(capsys.readouterr().out)] == ["n1-a1", "n2-b2"]


def test_a_lone_node_has_no_node_column(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answered(monkeypatch, [replica("app-web-1-r1", "")])
    reads.ps(True, None, "table")
    out = capsys.readouterr().out
    assert out.split()[0] == "REPLICA" and "NODE" not in out
