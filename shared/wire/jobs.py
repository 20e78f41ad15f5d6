"""Long operations (pull, push, build, export): a job's state and progress, as GetJob returns it."""

from __future__ import annotations

from typing import Literal

from shared.wire import MutableWire

JobState = Literal["running", "done", "failed", "cancelled"]


class ProgressItem(MutableWire):
    """One unit of a job's work: a layer being downloaded, a build stage."""

    name: str
    done: int = 0  # bytes or steps done
    total: int = 0  # 0 when unknown
    state: str = "waiting"  # free text: waiting, downloading, verifying, done, exists


class JobInfo(MutableWire):
    """What ``GetJob`` returns; the daemon that runs the job updates it in place."""

    id: int
    kind: str  # "pull", "push", "build", ...
    target: str  # what it works on: an image reference, a build tag
    started_at: float
    state: JobState = "running"
    finished_at: float | None = None
    items: list[ProgressItem] = []
    log_path: str = ""  # a file the job appends its output to; "" if none
    result: str = ""  # JSON of the job's result when done
    error: str = ""  # a sentence when failed
    error_name: str = ""  # the D-Bus error name when failed
