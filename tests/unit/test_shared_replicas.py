"""The replicas ``zlayerctl logs``/``exec`` and the REST API's logs and exec routes mean:
the newest revision's, in instance order, or the one an id or instance number names."""

from __future__ import annotations

import pytest

from shared.bus import ConflictError, NotFoundError
from shared.replicas import first_running, select_replicas
from shared.wire.agent import ReplicaInfo, ReplicaState


def replica(instance: int, revision: int, state: ReplicaState = "running") -> ReplicaInfo:
    return ReplicaInfo(
        id=f"d-web-{instance}-r{revision}",
        deployment="d",
        service="web",
        instance=instance,
        revision=revision,
        image="busybox",
        state=state,
    )


def test_newest_revision_in_instance_order_then_by_id_or_instance() -> None:
    old, two, one = replica(1, 1), replica(2, 2), replica(1, 2)
    assert select_replicas([old, two, one], "d", "web") == [one, two]
    assert select_replicas([old, two, one], "d", "web", "") == [one, two]
    assert select_replicas([old, two, one], "d", "web", 2) == [two]
    assert select_replicas([old, two, one], "d", "web", "2") == [two]
    assert select_replicas([old, two, one], "d", "web", "d-web-1-r2") == [one]


def test_the_sentences_when_nothing_fits() -> None:
    with pytest.raises(NotFoundError, match=r"^service web of d has no replicas$"):
        select_replicas([], "d", "web")
    # the old revision's replica is not one to pick
    with pytest.raises(NotFoundError, match=r"^web has no replica d-web-1-r1 \(replicas: 1, 2\)$"):
        select_replicas([replica(1, 1), replica(1, 2), replica(2, 2)], "d", "web", "d-web-1-r1")
    with pytest.raises(NotFoundError, match=r"^web has no replica 9 \(replicas: 1\)$"):
        select_replicas([replica(1, 1)], "d", "web", 9)


def test_exec_goes_to_the_first_running_one() -> None:
    stopped, running = replica(1, 1, "exited"), replica(2, 1)
    assert first_running([stopped, running], "web") is running
    with pytest.raises(
        ConflictError, match=r"^no replica of web is running; see `zlayerctl ps --containers`$"
    ):
        first_running([stopped], "web")
