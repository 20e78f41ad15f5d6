"""agentd tells of a replica's new state before it rewrites the replica's record file.

The record's rename over the old file can wait on the disk (ext4 flushes a file
renamed over another), which held back every ``ReplicaChanged`` by about 10 ms
on a busy node; the record is only read at agentd's next start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from daemons.agentd.replicas import Node, Replica, ReplicaRecord
from shared.spec import ServiceSpec
from shared.wire.agent import ReplicaInfo


def on_disk(path: Path) -> str:
    return str(msgspec.json.decode(path.read_bytes())["state"])


def test_the_new_state_is_told_before_the_record_is_rewritten(tmp_path: Path) -> None:
    told: list[tuple[str, str]] = []
    record_file = tmp_path / "replicas" / "shop-web-1-r1.json"

    def changed(info: ReplicaInfo) -> None:
        told.append((info.state, on_disk(record_file)))

    launcher: Any = None  # _update never starts anything
    neighbours: Any = None
    node = Node(tmp_path, launcher, neighbours, changed)
    record = ReplicaRecord(
        id="shop-web-1-r1",
        deployment="shop",
        service="web",
        instance=1,
        revision=1,
        image="zlayer/busybox:latest",
    )
    replica = Replica(record, ServiceSpec.model_validate({"image": "zlayer/busybox:latest"}))
    node._save(replica)

    node._update(replica, state="running", pid=4242)

    assert told == [("running", "creating")]  # told while the file still said creating
    assert on_disk(record_file) == "running"  # and the file follows at once

    node._update(replica, pid=4243)  # nothing a subscriber sees changed: nobody is told
    assert told == [("running", "creating")]
    assert msgspec.json.decode(record_file.read_bytes())["pid"] == 4243
