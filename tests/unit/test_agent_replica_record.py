"""agentd tells of a replica's new state before it rewrites the replica's record file,
and rewrites it in a thread, one write of a record at a time.

The record's rename over the old file can wait on the disk (ext4 flushes a file
renamed over another), which held back every ``ReplicaChanged`` by about 10 ms
on a busy node, and the event loop with it; the record is only read at
agentd's next start. Two writes of one record never land out of order, and a
record removed stays removed.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemons.agentd import replicas
from daemons.agentd.replicas import Node, Replica, ReplicaRecord
from shared.spec import ServiceSpec
from shared.wire.agent import ReplicaInfo

REPLICA_ID = "shop-web-1-r1"


def on_disk(path: Path) -> str:
    return str(msgspec.json.decode(path.read_bytes())["state"])


def make_node(tmp_path: Path, changed: Any = lambda info: None) -> Node:
    launcher: Any = None  # records are written; nothing is started
    neighbours: Any = None
    return Node(tmp_path, launcher, neighbours, changed)


def make_replica() -> Replica:
    record = ReplicaRecord(
        id=REPLICA_ID,
        deployment="shop",
        service="web",
        instance=1,
        revision=1,
        image="zlayer/busybox:latest",
    )
    return Replica(record, ServiceSpec.model_validate({"image": "zlayer/busybox:latest"}))


def test_the_new_state_is_told_at_once_and_the_record_file_follows(tmp_path: Path) -> None:
    told: list[tuple[str, str]] = []
    record_file = tmp_path / "replicas" / f"{REPLICA_ID}.json"

    def changed(info: ReplicaInfo) -> None:
        told.append((info.state, on_disk(record_file)))

    async def run() -> None:
        node = make_node(tmp_path, changed)
        replica = make_replica()
        node._save(replica)
        await node._records_written(REPLICA_ID)

        node._update(replica, state="running", pid=4242)
        assert told == [("running", "creating")]  # told at once, the file not yet rewritten
        await node._records_written(REPLICA_ID)
        assert on_disk(record_file) == "running"  # and the file follows

        node._update(replica, pid=4243)  # nothing a subscriber sees changed: nobody is told
        await node._records_written(REPLICA_ID)
        assert told == [("running", "creating")]
        assert msgspec.json.decode(record_file.read_bytes())["pid"] == 4243

    asyncio.run(run())


def test_records_are_written_off_the_event_loop_in_the_order_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_file = tmp_path / "replicas" / f"{REPLICA_ID}.json"
    first_write_may_end = threading.Event()
    written: list[tuple[str, bool]] = []  # (state, written on the event loop's thread)
    loop_thread = threading.get_ident()
    real_write = replicas.write_atomically

    def slow_write(path: Path, data: str | bytes, *args: Any, **kwargs: Any) -> None:
        if not written:
            assert first_write_may_end.wait(5)  # the first write hangs on a slow disk
        state = str(msgspec.json.decode(data)["state"])
        written.append((state, threading.get_ident() == loop_thread))
        real_write(path, data, *args, **kwargs)

    monkeypatch.setattr(replicas, "write_atomically", slow_write)

    async def run() -> None:
        node = make_node(tmp_path)
        replica = make_replica()
        node._save(replica)  # creating: its write hangs
        await asyncio.sleep(0.05)  # the loop went on meanwhile
        for state in ("initializing", "running", "exited"):
            node._update(replica, state=state)
        first_write_may_end.set()
        await node._records_written(REPLICA_ID)

    asyncio.run(run())
    # The states in between were replaced before their turn; the last one lands last.
    assert written == [("creating", False), ("exited", False)]
    assert on_disk(record_file) == "exited"


def test_a_removed_record_stays_removed_and_its_id_can_be_used_again(tmp_path: Path) -> None:
    record_file = tmp_path / "replicas" / f"{REPLICA_ID}.json"

    async def run() -> None:
        node = make_node(tmp_path)
        replica = make_replica()
        node._save(replica)
        node._update(replica, state="running")
        await node._remove_record(REPLICA_ID)  # asked while the writes are still waiting
        assert not record_file.exists()

        again = make_replica()  # a replica of the same id takes its place
        node._save(again)
        await node._records_written(REPLICA_ID)
        assert on_disk(record_file) == "creating"
        assert node._writers == {}

    asyncio.run(run())


def test_job_runs_are_kept_in_order_and_read_again_at_the_next_start(tmp_path: Path) -> None:
    from shared.wire.agent import JobRun

    def run_of(number: int, state: str = "succeeded") -> JobRun:
        return JobRun(
            id=f"run{number}",
            deployment="shop",
            service="nightly",
            trigger="manual",
            state=state,
            started_at=float(number),
        )

    async def first_life() -> list[str]:
        node = make_node(tmp_path)
        for number in range(1, replicas.JOB_RUNS_KEPT + 3):
            node._record_run(run_of(number, "running"))
            node._record_run(run_of(number))  # the same run, finished
        await node._file_written(node._runs_file("shop", "nightly"))
        return [run.id for run in node.job_runs("shop", "")]

    async def next_life() -> list[tuple[str, str]]:
        node = make_node(tmp_path)
        await node._load()
        return [(run.id, run.state) for run in node.job_runs("shop", "nightly")]

    kept = asyncio.run(first_life())
    newest = [f"run{n}" for n in range(replicas.JOB_RUNS_KEPT + 2, 2, -1)]
    assert kept == newest  # the newest first, no more than JOB_RUNS_KEPT, each run once
    assert asyncio.run(next_life()) == [(run_id, "succeeded") for run_id in newest]
