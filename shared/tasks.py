"""Small asyncio helpers the daemons share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks``, wait until each has ended, and empty the list."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        await cancel_and_wait(task)
    tasks.clear()


async def cancel_and_wait(task: asyncio.Task[Any], every: float = 1.0) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``every``
    seconds while it runs on: a cancellation can be lost (``asyncio.wait_for`` of
    Python 3.11 swallows one that lands as its inner call completes), and a loop that
    lost one would be awaited for ever. What the task raised was its own to report."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def ended_before_cancel(work: Awaitable[T]) -> T:
    """``work``'s result; if the caller is cancelled meanwhile, ``work`` still runs to its
    end before the cancellation goes on. For work in a thread (which cannot be stopped)
    that makes what the caller's clean-up removes: cleaning up while the thread still
    makes it leaves behind what the thread made after (a mount, a container)."""
    future = asyncio.ensure_future(work)
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait({future})  # a cancellation of this wait leaves the work be
        except asyncio.CancelledError:
            cancelled = True  # and again, as often as it comes: the work ends first
    if cancelled:
        with contextlib.suppress(BaseException):  # its own failure is the caller's no more
            future.result()
        raise asyncio.CancelledError
    return future.result()
