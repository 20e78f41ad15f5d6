"""shared.tasks: stopping a daemon's tasks ends even when a task loses a cancellation, and
work in a thread ends before a cancelled caller cleans up after it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from shared.tasks import cancel_all, cancel_and_wait, ended_before_cancel


async def loses_one_cancellation(stopped: list[str]) -> None:
    """A loop that, like one catching too much, survives its first cancellation."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    stopped.append("lost one")
    await asyncio.sleep(3600)


def test_a_task_that_lost_a_cancellation_is_cancelled_again_until_it_ends() -> None:
    async def main() -> list[str]:
        stopped: list[str] = []
        task = asyncio.create_task(loses_one_cancellation(stopped))
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(task, every=0.01), timeout=5)
        assert task.cancelled()
        return stopped

    assert asyncio.run(main()) == ["lost one"]


def test_cancel_all_ends_failed_and_running_tasks_and_empties_the_list() -> None:
    async def fails() -> None:
        raise RuntimeError("already reported by the task itself")

    async def main() -> None:
        tasks = [asyncio.create_task(fails()), asyncio.create_task(asyncio.sleep(3600))]
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_all(tasks), timeout=5)
        assert tasks == []

    asyncio.run(main())


def test_a_cancelled_caller_goes_on_only_once_its_thread_has_ended() -> None:
    made: list[str] = []
    started = threading.Event()

    def lay_out() -> str:
        started.set()
        time.sleep(0.3)  # a mount, a conmon create
        made.append("bundle")
        return "done"

    async def start() -> None:
        try:
            await ended_before_cancel(asyncio.to_thread(lay_out))
        except asyncio.CancelledError:
            made.append("clean-up")  # what the caller removes comes after what it made
            raise

    async def main() -> None:
        task = asyncio.create_task(start())
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # again (a removal, then agentd's stop): the thread still ends first
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    assert made == ["bundle", "clean-up"]


def test_work_that_is_not_cancelled_gives_its_result() -> None:
    async def main() -> str:
        return await ended_before_cancel(asyncio.to_thread(lambda: "laid out"))

    assert asyncio.run(main()) == "laid out"


def test_work_that_fails_gives_its_error() -> None:
    def broken() -> None:
        raise OSError("the disk is full")

    async def main() -> None:
        await ended_before_cancel(asyncio.to_thread(broken))

    with pytest.raises(OSError, match="the disk is full"):
        asyncio.run(main())
