"""apid's server-sent events: events as ``event:``/``data:`` pairs, heartbeat comments while
the source is quiet, and an ``error`` event with a sentence when the source fails."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from daemons.apid.streams import send_events
from shared.bus import UnavailableError
from shared.wire.api import OperationRef


async def _read_stream(source: AsyncIterator[tuple[str, object]], heartbeat: float) -> list[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await send_events(request, source, heartbeat=heartbeat)

    app = web.Application()
    app.router.add_get("/stream", handler)
    async with (
        TestServer(app) as server,
        ClientSession() as session,
        session.get(server.make_url("/stream")) as reply,
    ):
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/event-stream"
        return (await reply.text()).splitlines()


def test_events_heartbeats_and_the_end_of_a_stream() -> None:
    async def source() -> AsyncIterator[tuple[str, object]]:
        yield "first", OperationRef(daemon="scheduler", id=1)
        await asyncio.sleep(0.5)  # quiet: heartbeats go out meanwhile
        yield "second", OperationRef(daemon="registry", id=2)

    lines = asyncio.run(_read_stream(source(), heartbeat=0.1))
    events = [line for line in lines if line.startswith(("event:", "data:"))]
    assert events == [
        "event: first",
        'data: {"daemon":"scheduler","id":1}',
        "event: second",
        'data: {"daemon":"registry","id":2}',
    ]
    first, second = lines.index("event: first"), lines.index("event: second")
    assert ": heartbeat" in lines[first:second]


def test_a_failing_source_ends_the_stream_with_its_sentence() -> None:
    async def source() -> AsyncIterator[tuple[str, object]]:
        yield "first", OperationRef(daemon="scheduler", id=1)
        raise UnavailableError("zlayer-schedd is restarting; try again")

    lines = asyncio.run(_read_stream(source(), heartbeat=5))
    error = lines.index("event: error")
    assert json.loads(lines[error + 1][len("data: ") :]) == "zlayer-schedd is restarting; try again"
    assert not any("Traceback" in line for line in lines)
