"""shared.jobs: a job answers at once, reports progress, and ends with one signal."""

from __future__ import annotations

import asyncio
import json

from shared.bus import NotFoundError
from shared.jobs import Job, JobTable
from shared.wire import encode, to_builtins


def test_job_reports_progress_and_its_result_once() -> None:
    removed: list[tuple[int, dict[str, object]]] = []
    release = asyncio.Event()

    async def work(job: Job) -> str:
        job.progress("sha256:aa", total=10, state="downloading")
        await release.wait()
        job.progress("sha256:aa", done=10, state="done")
        return json.dumps({"digest": "sha256:aa"})

    async def run() -> None:
        table = JobTable(lambda info, path: removed.append((info.id, to_builtins(info))))
        job_id = table.start("pull", "busybox:latest", work)
        await asyncio.sleep(0)
        running = table.get(job_id)
        assert running is not None and running.state == "running"
        assert running.items[0].total == 10 and running.items[0].state == "downloading"
        assert removed == []
        release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        done = table.get(job_id)
        assert done is not None and done.state == "done"
        assert json.loads(done.result) == {"digest": "sha256:aa"}
        assert [(i, info["state"]) for i, info in removed] == [(job_id, "done")]

    asyncio.run(run())


def test_a_failed_job_carries_the_sentence_and_error_name() -> None:
    removed: list[str] = []

    async def work(job: Job) -> str:
        raise NotFoundError("the image nope:1 does not exist in the registry")

    async def run() -> None:
        table = JobTable(lambda info, path: removed.append(encode(info)))
        job_id = table.start("pull", "nope:1", work)
        for _ in range(5):
            await asyncio.sleep(0)
        info = table.get(job_id)
        assert info is not None and info.state == "failed"
        assert info.error == "the image nope:1 does not exist in the registry"
        assert info.error_name == "org.zlayer.Error.NotFound"
        assert len(removed) == 1

    asyncio.run(run())


def test_cancel_ends_a_running_job() -> None:
    async def work(job: Job) -> str:
        await asyncio.sleep(60)
        return ""

    async def run() -> None:
        table = JobTable(lambda info, path: None)
        job_id = table.start("build", "app:dev", work)
        await asyncio.sleep(0)
        assert table.cancel(job_id)
        for _ in range(5):
            await asyncio.sleep(0)
        info = table.get(job_id)
        assert info is not None and info.state == "cancelled"
        assert not table.cancel(job_id)
        await table.close()

    asyncio.run(run())
