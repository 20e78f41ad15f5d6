"""Jobs: long bus operations that answer at once and finish in the background.

The systemd idiom (``StartUnit`` returns a job, ``JobRemoved`` carries its
result): a daemon method that may take longer than a moment (a pull, a
build) starts a :class:`Job` in its :class:`JobTable` and returns the job's
id. The caller then watches ``GetJob(id)`` (state, per-item progress, a log
file path for streamed output) and the ``JobRemoved(id, result)`` signal.

Finished jobs stay readable for a while (``KEEP_FINISHED``) so a caller that
polls after the signal still sees the result. Jobs live in the daemon's
memory only: a daemon restarted mid-job loses the job, and the caller sees
``NotFound`` for its id and says so; the work itself must be safe to start
again (pulls resume, builds rerun).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from shared.wire import encode
from shared.wire.jobs import JobInfo, ProgressItem

log = logging.getLogger("zlayer.jobs")

KEEP_FINISHED = 600.0  # seconds a finished job stays readable


class Job:
    """Handle a running job's work uses to report progress."""

    def __init__(self, info: JobInfo) -> None:
        self.info = info
        self._items: dict[str, ProgressItem] = {}

    def progress(
        self, name: str, *, done: int | None = None, total: int | None = None, state: str = ""
    ) -> None:
        item = self._items.get(name)
        if item is None:
            item = self._items[name] = ProgressItem(name=name)
            self.info.items.append(item)
        if done is not None:
            item.done = done
        if total is not None:
            item.total = total
        if state:
            item.state = state


Work = Callable[[Job], Awaitable[str]]


class JobTable:
    """The jobs of one daemon; ``removed`` is called with (id, JobInfo JSON) when one ends."""

    def __init__(self, removed: Callable[[int, str], None]) -> None:
        self._removed = removed
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, kind: str, target: str, work: Work, log_path: str = "") -> int:
        self._forget_old()
        job_id = next(self._ids)
        job = Job(
            JobInfo(id=job_id, kind=kind, target=target, started_at=time.time(), log_path=log_path)
        )
        self._jobs[job_id] = job
        self._tasks[job_id] = asyncio.create_task(self._run(job, work), name=f"job-{job_id}")
        return job_id

    async def _run(self, job: Job, work: Work) -> None:
        info = job.info
        try:
            info.result = await work(job)
            info.state = "done"
        except asyncio.CancelledError:
            info.state = "cancelled"
            info.error = "the job was cancelled"
        except Exception as exc:  # the job's failure is its result, not the daemon's
            info.state = "failed"
            info.error = str(exc) or type(exc).__name__
            info.error_name = str(getattr(exc, "dbus_error_name", "") or "")
            if not info.error_name:
                log.exception("%s job %d (%s) failed", info.kind, info.id, info.target)
        finally:
            info.finished_at = time.time()
            self._tasks.pop(info.id, None)
            with contextlib.suppress(Exception):
                self._removed(info.id, encode(info))

    def get(self, job_id: int) -> JobInfo | None:
        job = self._jobs.get(job_id)
        return job.info if job else None

    def list(self) -> list[JobInfo]:
        return [job.info for job in self._jobs.values()]

    def cancel(self, job_id: int) -> bool:
        task = self._tasks.get(job_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _forget_old(self) -> None:
        cutoff = time.time() - KEEP_FINISHED
        for job_id, job in list(self._jobs.items()):
            finished = job.info.finished_at
            if finished is not None and finished < cutoff:
                del self._jobs[job_id]
