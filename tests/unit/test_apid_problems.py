"""apid's problem middleware on a real aiohttp server: an error no handler expected is a
500 problem document with one sentence (the stack goes to the log, never to the caller),
and a bus error is its status with the daemon's sentence."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from daemons.apid.problems import PROBLEM_JSON, problem_middleware
from shared.bus import NotFoundError


async def _failing(_request: web.Request) -> web.Response:
    raise RuntimeError("secret internals /etc/zlayer")


async def _missing(_request: web.Request) -> web.Response:
    raise NotFoundError("there is no deployment named x (deployments: none)")


async def _ask(path: str) -> tuple[int, str, dict[str, object]]:
    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/fail", _failing)
    app.router.add_get("/missing", _missing)
    async with (
        TestServer(app) as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url(path)) as response,
    ):
        return response.status, response.content_type, json.loads(await response.read())


def test_unexpected_error_is_a_500_sentence_and_its_stack_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="zlayer.apid"):
        status, media, body = asyncio.run(_ask("/fail"))
    assert (status, media) == (500, PROBLEM_JSON)
    assert body["detail"] == (
        "apid failed to answer this request; its journal says why (zlayer-apid.service)"
    )
    assert "secret internals" not in json.dumps(body)
    (record,) = [r for r in caplog.records if r.name == "zlayer.apid"]
    assert record.getMessage() == "GET /fail failed" and record.exc_info is not None


def test_a_bus_error_keeps_the_daemons_sentence() -> None:
    status, media, body = asyncio.run(_ask("/missing"))
    assert (status, media) == (404, PROBLEM_JSON)
    assert body["detail"] == "there is no deployment named x (deployments: none)"
    assert body["type"] == "urn:zlayer:error:NotFoundError"
