"""Server-sent events: one ``data:`` line of JSON per event, its kind as ``event:``, and a
comment line every HEARTBEAT seconds so proxies and clients know the stream is alive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from daemons.apid.base import query_flag
from shared.wire import encode

HEARTBEAT = 15.0
EVENT_STREAM = "text/event-stream"

_END = object()


def wants_stream(request: web.Request) -> bool:
    """``?follow=true`` or ``Accept: text/event-stream``."""
    return query_flag(request, "follow") or EVENT_STREAM in request.headers.get("Accept", "")


async def send_events(
    request: web.Request,
    source: AsyncIterator[tuple[str, object]],
    heartbeat: float = HEARTBEAT,
) -> web.StreamResponse:
    """Stream ``(kind, value)`` pairs from ``source`` until it ends or the client leaves.

    The source runs in its own task feeding a queue, so waiting for the
    heartbeat never cancels it in the middle of a bus call.
    """
    response = web.StreamResponse(
        headers={
            "Content-Type": EVENT_STREAM,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not hold events back
        }
    )
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1000)
    failure: list[BaseException] = []

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put(item)
        except Exception as exc:  # the bus went away: end the stream, say why
            failure.append(exc)
        finally:
            await queue.put(_END)

    task = asyncio.create_task(pump(), name="sse-source")
    try:
        await response.prepare(request)
        await response.write(b": stream open\n\n")
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), heartbeat)
            except TimeoutError:
                await response.write(b": heartbeat\n\n")
                continue
            if not isinstance(item, tuple):  # _END
                break
            kind, value = item
            await response.write(f"event: {kind}\ndata: {encode(value)}\n\n".encode())
        if failure:
            from ctl.errors import explain

            await response.write(f"event: error\ndata: {encode(explain(failure[0]))}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        # the client left; nothing more to send
        pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return response
