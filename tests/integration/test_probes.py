"""Health checks and init steps against real TCP and HTTP servers on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from daemons.agentd import probes
from shared.spec.models import InitStep, ServiceSpec


def service(**fields: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"image": "zlayer/busybox", **fields})


async def http_server(status: int = 200) -> tuple[web.AppRunner, int]:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=status, text="ok")

    app = web.Application()
    app.router.add_get("/health", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def never_run(argv: list[str], timeout: float) -> int:
    raise AssertionError("no command expected")


def test_tcp_check_open_and_closed_ports() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        assert await probes.check_tcp("127.0.0.1", port, 1.0) is None
        server.close()
        await server.wait_closed()
        reason = await probes.check_tcp("127.0.0.1", port, 1.0)
        assert reason is not None and f"127.0.0.1:{port}" in reason

    asyncio.run(scenario())


def test_http_check_status_and_relative_url() -> None:
    async def scenario() -> None:
        runner, port = await http_server(200)
        svc = service(
            endpoints=[{"name": "web", "protocol": "http", "port": 80, "target_port": port}],
            health={"check": {"type": "http", "url": "/health"}},
        )
        assert await probes.check_once(svc.health, svc, "127.0.0.1", never_run) is None
        await runner.cleanup()
        runner, port = await http_server(503)
        reason = await probes.check_http(f"http://127.0.0.1:{port}/health", 200, 1.0)
        assert reason is not None and "503" in reason
        await runner.cleanup()

    asyncio.run(scenario())


def test_command_check_uses_the_exit_code() -> None:
    async def exits(code: int) -> probes.RunCommand:
        async def run(argv: list[str], timeout: float) -> int:
            assert argv == ["/bin/sh", "-c", "test -f /ready"]
            return code

        return run

    async def scenario() -> None:
        svc = service(health={"check": {"type": "command", "command": "test -f /ready"}})
        assert await probes.check_once(svc.health, svc, "", await exits(0)) is None
        reason = await probes.check_once(svc.health, svc, "", await exits(1))
        assert reason is not None and "exited with 1" in reason

    asyncio.run(scenario())


def test_monitor_turns_unhealthy_after_retries_and_back() -> None:
    async def scenario() -> None:
        runner, port = await http_server(200)
        svc = service(
            endpoints=[{"name": "web", "protocol": "http", "port": port}],
            health={
                "interval": "100ms",
                "timeout": "500ms",
                "retries": 1,
                "check": {"type": "tcp"},
            },
        )
        reports: list[probes.HealthResult] = []
        task = asyncio.create_task(probes.monitor(svc, "127.0.0.1", never_run, reports.append))
        await asyncio.sleep(0.5)
        assert [r.healthy for r in reports] == [True]
        await runner.cleanup()
        await asyncio.sleep(1.0)
        assert [r.healthy for r in reports] == [True, False]
        task.cancel()

    asyncio.run(scenario())


def step(**fields: Any) -> InitStep:
    return InitStep.model_validate({"id": "s", **fields})


def test_wait_tcp_waits_for_a_late_server() -> None:
    async def scenario() -> None:
        probe = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()

        async def late() -> asyncio.Server:
            await asyncio.sleep(0.6)
            return await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)

        starter = asyncio.create_task(late())
        notes: list[str] = []
        await probes.run_init(
            [
                step(
                    uses="init.wait_tcp",
                    timeout="5s",
                    **{"with": {"host": "127.0.0.1", "port": port}},
                )
            ],
            "127.0.0.1",
            never_run,
            notes.append,
        )
        assert notes == ["init step s done"]
        server = await starter
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("on_failure", "raises"), [("fail", True), ("warn", False), ("continue", False)]
)
def test_run_step_retries_then_applies_on_failure(on_failure: str, raises: bool) -> None:
    calls: list[list[str]] = []

    async def failing(argv: list[str], timeout: float) -> int:
        calls.append(argv)
        return 3

    async def scenario() -> list[str]:
        notes: list[str] = []
        steps = [
            step(
                uses="init.run", retry=1, on_failure=on_failure, **{"with": {"command": "migrate"}}
            )
        ]
        if raises:
            with pytest.raises(probes.InitFailed, match="exited with 3"):
                await probes.run_init(steps, "", failing, notes.append)
        else:
            await probes.run_init(steps, "", failing, notes.append)
        return notes

    notes = asyncio.run(scenario())
    assert calls == [["/bin/sh", "-c", "migrate"]] * 2
    assert bool(notes) == (on_failure == "warn")


def test_a_step_missing_its_parameters_is_named() -> None:
    async def scenario() -> None:
        with pytest.raises(probes.InitFailed, match=r"init\.wait_tcp needs"):
            await probes.run_init([step(uses="init.wait_tcp")], "", never_run, lambda _: None)

    asyncio.run(scenario())
