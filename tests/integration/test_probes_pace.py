"""How soon health checks find a replica that starts, against real servers on loopback.

Until a replica's first success its probes come quickly, so one whose port
opens a moment after the first probe enters rotation at once instead of
waiting half a second or an interval; and those quick probes do not use up
its ``retries`` faster than probes at the old pace did.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from daemons.agentd import probes
from shared.spec.models import ServiceSpec


def service(**fields: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"image": "zlayer/busybox", **fields})


async def never_run(argv: list[str], timeout: float) -> int:
    raise AssertionError("no command expected")


async def ready_after(failures: int) -> tuple[web.AppRunner, int, list[float]]:
    """An HTTP server whose /health answers 503 ``failures`` times, then 200; and when
    each request came."""
    seen: list[float] = []

    async def handler(_request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        return web.Response(status=200 if len(seen) > failures else 503, text="ok")

    app = web.Application()
    app.router.add_get("/health", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1], seen


def test_a_replica_that_fails_its_first_probe_is_healthy_soon_after() -> None:
    """The first probe lands before the server is ready; the next one, not an interval
    (10 s) or half a second later, finds it healthy."""

    async def scenario() -> tuple[float, list[bool]]:
        runner, port, _seen = await ready_after(1)
        svc = service(
            endpoints=[{"name": "web", "protocol": "http", "port": 80, "target_port": port}],
            health={"interval": "10s", "check": {"type": "http", "url": "/health"}},
        )
        reports: list[probes.HealthResult] = []
        healthy = asyncio.Event()

        def report(result: probes.HealthResult) -> None:
            reports.append(result)
            healthy.set()

        started = time.monotonic()
        task = asyncio.create_task(probes.monitor(svc, "127.0.0.1", never_run, report))
        try:
            await asyncio.wait_for(healthy.wait(), 10)
            took = time.monotonic() - started
        finally:
            task.cancel()
            await runner.cleanup()
        return took, [r.healthy for r in reports]

    took, reports = asyncio.run(scenario())
    assert reports == [True]
    # The old pace retried after a flat 0.5 s; the new one after 10 ms. The bound keeps
    # all the room a loaded machine needs short of the old half second.
    assert took < 0.45, f"healthy {took:.2f}s after the first probe"


def test_quick_probes_do_not_use_up_the_retries_of_a_slow_starter() -> None:
    """retries: 3 and no start_grace: a server that opens its port after 0.8 s is found
    healthy and never reported unhealthy, as at one probe per half second."""

    async def scenario() -> list[bool]:
        closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        svc = service(
            endpoints=[{"name": "db", "protocol": "tcp", "port": port}],
            health={"interval": "10s", "retries": 3, "check": {"type": "tcp"}},
        )
        reports: list[probes.HealthResult] = []
        task = asyncio.create_task(probes.monitor(svc, "127.0.0.1", never_run, reports.append))
        await asyncio.sleep(0.8)
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        try:
            deadline = time.monotonic() + 10
            while not reports and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            server.close()
            await server.wait_closed()
        return [r.healthy for r in reports]

    assert asyncio.run(scenario()) == [True]


def test_a_replica_that_never_answers_is_unhealthy_after_its_retries() -> None:
    """The quick probes still end in unhealthy once ``retries`` failures have counted,
    and not before: with retries 2, at least two half-second steps after the first."""

    async def scenario() -> tuple[float, list[bool], int]:
        runner, port, seen = await ready_after(1_000_000)
        svc = service(
            endpoints=[{"name": "web", "protocol": "http", "port": port}],
            health={"interval": "10s", "retries": 2, "check": {"type": "http", "url": "/health"}},
        )
        reports: list[probes.HealthResult] = []
        unhealthy = asyncio.Event()

        def report(result: probes.HealthResult) -> None:
            reports.append(result)
            unhealthy.set()

        started = time.monotonic()
        task = asyncio.create_task(probes.monitor(svc, "127.0.0.1", never_run, report))
        try:
            await asyncio.wait_for(unhealthy.wait(), 10)
            took = time.monotonic() - started
        finally:
            task.cancel()
            await runner.cleanup()
        return took, [r.healthy for r in reports], len(seen)

    took, reports, probed = asyncio.run(scenario())
    assert reports == [False]
    assert took >= 1.0, f"unhealthy after {took:.2f}s"
    assert probed > 3, "no quick probes before the first success"


def test_probes_in_the_first_moments_come_a_few_ms_apart() -> None:
    """In its first FAST_WINDOW a starting replica is probed every few ms (a precompiled
    wasmtime serve opens its port then), so an open port is seen at once: more probes
    than the 20 ms pace of the rest of the first second can give (16 in 0.3 s)."""

    async def scenario() -> int:
        runner, port, seen = await ready_after(1_000_000)
        svc = service(
            endpoints=[{"name": "web", "protocol": "http", "port": port}],
            health={"interval": "10s", "retries": 100, "check": {"type": "http", "url": "/health"}},
        )
        started = time.monotonic()
        task = asyncio.create_task(probes.monitor(svc, "127.0.0.1", never_run, lambda _r: None))
        try:
            await asyncio.sleep(probes.FAST_WINDOW + 0.2)
        finally:
            task.cancel()
            await runner.cleanup()
        return sum(1 for at in seen if at - started < probes.FAST_WINDOW)

    assert asyncio.run(scenario()) > 20
