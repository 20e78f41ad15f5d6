"""Jobs: long bus operations that answer at once and finish in the background.

The systemd idiom: a daemon method that may take longer than a moment (a
pull, a build) starts a :class:`Job` in its :class:`JobTable` and returns the
job's id. While it runs the job is a ``org.zlayer.Job1`` object (see
``shared.bus``) at ``<daemon object>/job/<id>``, whose ``State`` and
``Progress`` properties announce their changes; the daemon's ``JobNew``
signal says a job started and ``JobRemoved`` carries its final JobInfo (the
result, or the error's sentence and D-Bus name). A client subscribes, starts
the job and waits for the signal (``shared.clients.JobsDaemonClient.run_job``).
registryd's pulls, pushes, builds and exports are jobs, and so are schedd's
deploys and downs, which wait for the deployment to converge or go.

Finished jobs stay readable with ``GetJob`` for a while (``KEEP_FINISHED``)
so a caller that missed the signal still sees the result. Jobs live in the
daemon's memory only: a daemon restarted mid-job loses the job, and the
caller sees ``NotFound`` for its id and says so; the work itself must be
safe to start again (pulls resume, builds rerun).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from sdbus import SdBus, dbus_method_async_override, dbus_property_async_override
from sdbus.dbus_proxy_async_interface_base import DbusExportHandle

from shared.bus import Job1, NotFoundError
from shared.wire import encode
from shared.wire.jobs import JobInfo, JobState, ProgressItem

log = logging.getLogger("zlayer.jobs")

KEEP_FINISHED = 600.0  # seconds a finished job stays readable
PROGRESS_INTERVAL = 0.1  # at most this often a running job announces its progress


class Job:
    """Handle a running job's work uses to report progress.

    ``progress`` only records (it may be called from a worker thread); the
    table announces what changed on the bus at most every PROGRESS_INTERVAL.
    """

    def __init__(self, info: JobInfo) -> None:
        self.info = info
        self._items: dict[str, ProgressItem] = {}
        self.changed = False

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
        self.changed = True


Work = Callable[[Job], Awaitable[str]]
JobSignal = Callable[[JobInfo, str], None]  # (the job, its object path)


class JobObject(Job1):
    """The bus object of one running job."""

    def __init__(self, job: Job, cancel: Callable[[int], bool]) -> None:
        super().__init__()
        self._job = job
        self._cancel = cancel

    @dbus_property_async_override()
    def id(self) -> int:
        return self._job.info.id

    @dbus_property_async_override()
    def kind(self) -> str:
        return self._job.info.kind

    @dbus_property_async_override()
    def target(self) -> str:
        return self._job.info.target

    @dbus_property_async_override()
    def log_path(self) -> str:
        return self._job.info.log_path

    @dbus_property_async_override()
    def state(self) -> str:
        return self._job.info.state

    @state.setter_private
    def _state_changed(self, value: str) -> None:
        """The JobInfo holds the state; setting only announces it."""

    @dbus_property_async_override()
    def progress(self) -> str:
        return encode(self._job.info.items)

    @progress.setter_private
    def _progress_changed(self, value: str) -> None:
        """The JobInfo holds the items; setting only announces them."""

    @dbus_method_async_override()
    async def get_info(self) -> str:
        return encode(self._job.info)

    @dbus_method_async_override()
    async def cancel(self) -> None:
        self._cancel(self._job.info.id)


class JobTable:
    """The jobs of one daemon, exported on its bus once :meth:`attach` is called.

    ``on_new`` and ``on_removed`` are called with the job and its object path
    when a job starts and ends; the daemon emits its JobNew/JobRemoved there.
    """

    def __init__(self, on_removed: JobSignal, on_new: JobSignal | None = None) -> None:
        self._on_removed = on_removed
        self._on_new = on_new
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._bus: SdBus | None = None
        self._base_path = ""

    def attach(self, bus: SdBus, object_path: str) -> None:
        """Export jobs from now on under ``object_path``/job/<id> on ``bus``."""
        self._bus = bus
        self._base_path = object_path

    def path(self, job_id: int) -> str:
        return f"{self._base_path}/job/{job_id}" if self._base_path else ""

    def start(self, kind: str, target: str, work: Work, log_path: str = "") -> int:
        self._forget_old()
        job_id = next(self._ids)
        job = Job(
            JobInfo(id=job_id, kind=kind, target=target, started_at=time.time(), log_path=log_path)
        )
        self._jobs[job_id] = job
        exported = self._export(job)
        self._tasks[job_id] = asyncio.create_task(
            self._run(job, work, exported), name=f"job-{job_id}"
        )
        if self._on_new is not None:
            with contextlib.suppress(Exception):
                self._on_new(job.info, self.path(job_id))
        return job_id

    def _export(self, job: Job) -> tuple[JobObject, DbusExportHandle] | None:
        if self._bus is None:
            return None
        obj = JobObject(job, self.cancel)
        try:
            return obj, obj.export_to_dbus(self.path(job.info.id), self._bus)
        except Exception as exc:  # the job still runs; GetJob and JobRemoved still tell
            log.warning("could not put job %d on the bus: %s", job.info.id, exc)
            return None

    async def _run(
        self, job: Job, work: Work, exported: tuple[JobObject, DbusExportHandle] | None
    ) -> None:
        info = job.info
        announcer = None
        if exported is not None:
            announcer = asyncio.create_task(self._announce_progress(job, exported[0]))
        try:
            info.result = await work(job)
            self._set_state(info, "done")
        except asyncio.CancelledError:
            self._set_state(info, "cancelled")
            info.error = "the job was cancelled"
        except Exception as exc:  # the job's failure is its result, not the daemon's
            self._set_state(info, "failed")
            info.error = str(exc) or type(exc).__name__
            info.error_name = str(getattr(exc, "dbus_error_name", "") or "")
            if not info.error_name:
                log.exception("%s job %d (%s) failed", info.kind, info.id, info.target)
        finally:
            info.finished_at = time.time()
            self._tasks.pop(info.id, None)
            if announcer is not None:
                announcer.cancel()
            if exported is not None:
                obj, handle = exported
                with contextlib.suppress(Exception):
                    await obj.progress.set_async(encode(info.items))
                    await obj.state.set_async(info.state)
                with contextlib.suppress(Exception):
                    handle.stop()
            with contextlib.suppress(Exception):
                self._on_removed(info, self.path(info.id))

    @staticmethod
    def _set_state(info: JobInfo, state: JobState) -> None:
        info.state = state

    @staticmethod
    async def _announce_progress(job: Job, obj: JobObject) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            if job.changed:
                job.changed = False
                with contextlib.suppress(Exception):
                    await obj.progress.set_async(encode(job.info.items))

    def get(self, job_id: int) -> JobInfo | None:
        job = self._jobs.get(job_id)
        return job.info if job else None

    def require(self, job_id: int, daemon: str) -> JobInfo:
        """``GetJob``: the job's info, or NotFound saying why ``daemon`` does not know it."""
        info = self.get(job_id)
        if info is None:
            raise NotFoundError(
                f"job {job_id} is not known to {daemon} (it ended long ago, "
                "or the daemon restarted since)"
            )
        return info

    def cancel_running(self, job_id: int) -> None:
        """``CancelJob``: cancel the job, or NotFound if it is not running."""
        if not self.cancel(job_id):
            raise NotFoundError(f"job {job_id} is not running")

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
