"""Health checks and init steps: is a replica up, and may it start?

Pure asyncio with timeouts; nothing here knows about containers. A command
check or ``init.run`` step is handed a ``run`` callable by the caller, which
runs the command in the replica and returns its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from shared.spec.models import HealthSpec, InitStep, ServiceSpec

log = logging.getLogger("zlayer.agentd.probes")

RunCommand = Callable[[list[str], float], Awaitable[int]]

DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 3.0
DEFAULT_STEP_TIMEOUT = 60.0
WAIT_POLL = 0.25
# Until a replica's first success: the first retry after a failed probe comes this
# soon and each next one twice as late, up to STARTING_PACE (or the interval, if
# shorter). A server that opens its port a moment after the first probe is then
# found within milliseconds, not half a second later.
FIRST_RETRY = 0.01
STARTING_PACE = 0.5
# A TCP or HTTP probe costs next to nothing, and most servers open their port within
# a second of starting (wasmtime serve in 50-200 ms): in the first QUICK_WINDOW
# seconds those probes are never more than QUICK_STEP apart, and in the first
# FAST_WINDOW (where a precompiled wasmtime serve opens its port) never more than
# FAST_STEP, so the port is seen open at most a few ms late. A command probe starts
# a process in the replica each time, so it only doubles.
QUICK_WINDOW = 1.0
QUICK_STEP = 0.02
FAST_WINDOW = 0.3
FAST_STEP = 0.004


def _seconds(value: timedelta | None, default: float) -> float:
    return value.total_seconds() if value is not None else default


def container_port(service: ServiceSpec) -> int | None:
    """The port the replica itself listens on for its first endpoint."""
    if not service.endpoints:
        return None
    first = service.endpoints[0]
    return first.target_port or first.port


async def check_tcp(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens, else why not."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"no TCP answer on {host}:{port} within {timeout:.1f}s"
    except OSError as exc:
        return f"TCP connect to {host}:{port} failed: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def check_http(url: str, expect_status: int, timeout: float) -> str | None:
    """None when GET ``url`` answers ``expect_status``, else why not."""
    import aiohttp  # only once a service has an HTTP check

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != expect_status:
                return f"GET {url} answered {response.status}, expected {expect_status}"
            return None
    except TimeoutError:
        return f"GET {url} did not answer within {timeout:.1f}s"
    except aiohttp.ClientError as exc:
        return f"GET {url} failed: {exc}"


def http_url(url: str, address: str, port: int | None) -> str:
    """A relative url ("/health") means the replica's own first endpoint."""
    if urlsplit(url).scheme:
        return url
    if port is None:
        raise ValueError(f"health url {url!r} is relative but the service has no endpoint")
    path = url if url.startswith("/") else "/" + url
    return f"http://{address}:{port}{path}"


async def check_once(
    health: HealthSpec, service: ServiceSpec, address: str, run: RunCommand
) -> str | None:
    """Run the service's check once against a replica at ``address``."""
    from shared.spec.models import CommandCheck, HttpCheck, TcpCheck

    timeout = _seconds(health.timeout, DEFAULT_TIMEOUT)
    check = health.check
    if isinstance(check, TcpCheck):
        port = check.port or container_port(service)
        if port is None:
            return None  # nothing to probe: the default check of a service without endpoints
        return await check_tcp(address, port, timeout)
    if isinstance(check, HttpCheck):
        try:
            url = http_url(check.url, address, container_port(service))
        except ValueError as exc:
            return str(exc)
        return await check_http(url, check.expect_status, timeout)
    assert isinstance(check, CommandCheck)
    argv = check.command if isinstance(check.command, list) else ["/bin/sh", "-c", check.command]
    try:
        code = await asyncio.wait_for(run(argv, timeout), timeout + 1)
    except TimeoutError:
        return f"`{shlex.join(argv)}` did not finish within {timeout:.1f}s"
    return None if code == 0 else f"`{shlex.join(argv)}` exited with {code}"


def has_probe(service: ServiceSpec) -> bool:
    """Whether the service has anything to check (the default TCP check needs an endpoint)."""
    from shared.spec.models import TcpCheck

    check = service.health.check
    return not (isinstance(check, TcpCheck) and check.port is None and not service.endpoints)


@dataclass
class HealthResult:
    healthy: bool
    reason: str


async def monitor(
    service: ServiceSpec,
    address: str,
    run: RunCommand,
    report: Callable[[HealthResult], None],
) -> None:
    """Check forever; report on every change: healthy after the first success,
    unhealthy after ``retries`` consecutive failures once ``start_grace`` is over.

    The first probe runs at once. Until the first success the next ones come
    quickly (FIRST_RETRY, doubling up to STARTING_PACE; TCP and HTTP probes
    at most FAST_STEP apart in the first FAST_WINDOW and QUICK_STEP apart in
    the first QUICK_WINDOW), then every
    ``interval``. A failure counts toward ``retries`` at most once per
    STARTING_PACE (or per interval, if shorter), so the quick probes give a
    slow starter no less time than probes at that pace would.
    """
    from shared.spec.models import CommandCheck

    health = service.health
    interval = _seconds(health.interval, DEFAULT_INTERVAL)
    pace = min(interval, STARTING_PACE)
    quick = not isinstance(health.check, CommandCheck)
    quick_until = time.monotonic() + (QUICK_WINDOW if quick else 0.0)
    fast_until = time.monotonic() + (FAST_WINDOW if quick else 0.0)
    grace_until = time.monotonic() + _seconds(health.start_grace, 0.0)
    failures = 0
    counted_at = -math.inf  # when a failure last counted toward retries
    retry = FIRST_RETRY
    state: bool | None = None
    while True:
        started = time.monotonic()
        reason = await check_once(health, service, address, run)
        now = time.monotonic()
        if reason is None:
            failures = 0
            if state is not True:
                state = True
                report(HealthResult(True, "health check passed"))
        else:
            if state is True or now - counted_at >= pace:
                failures += 1
                counted_at = now
            in_grace = now < grace_until and state is not True
            if not in_grace and failures > health.retries and state is not False:
                state = False
                report(HealthResult(False, reason))
        if state is True:
            pause = interval
        else:
            pause = min(retry, pace)
            retry *= 2
            if now < fast_until:
                pause = min(pause, FAST_STEP)
            elif now < quick_until:
                pause = min(pause, QUICK_STEP)
        await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))


# ---------------------------------------------------------------- init steps


class InitFailed(Exception):
    """An init step failed with on_failure: fail."""


async def _wait_until(probe: Callable[[], Awaitable[str | None]], deadline: float) -> str | None:
    reason: str | None = "not tried"
    while time.monotonic() < deadline:
        reason = await probe()
        if reason is None:
            return None
        await asyncio.sleep(WAIT_POLL)
    return reason


async def run_step(step: InitStep, address: str, run: RunCommand) -> str | None:
    """One attempt of one init step; None on success, else why it failed."""
    params: dict[str, Any] = step.with_
    timeout = _seconds(step.timeout, DEFAULT_STEP_TIMEOUT)
    deadline = time.monotonic() + timeout
    if step.uses == "init.wait_tcp":
        host = str(params.get("host", address))
        port = int(params["port"])
        return await _wait_until(lambda: check_tcp(host, port, min(2.0, timeout)), deadline)
    if step.uses == "init.wait_http":
        url = str(params["url"])
        expect = int(params.get("expect_status", 200))
        return await _wait_until(lambda: check_http(url, expect, min(2.0, timeout)), deadline)
    if step.uses == "init.run":
        command = params.get("command")
        argv = command if isinstance(command, list) else ["/bin/sh", "-c", str(command)]
        try:
            code = await asyncio.wait_for(run([str(a) for a in argv], timeout), timeout + 1)
        except TimeoutError:
            return f"did not finish within {timeout:.0f}s"
        return None if code == 0 else f"exited with {code}"
    return f"{step.uses} is not available yet on this node"


def step_problem(step: InitStep) -> str | None:
    """A step whose parameters cannot work, caught before anything runs."""
    params = step.with_
    if step.uses == "init.wait_tcp" and not isinstance(params.get("port"), int):
        return f"init step {step.id}: init.wait_tcp needs `with: {{port: N}}`"
    if step.uses == "init.wait_http" and not params.get("url"):
        return f"init step {step.id}: init.wait_http needs `with: {{url: ...}}`"
    if step.uses == "init.run" and not params.get("command"):
        return f"init step {step.id}: init.run needs `with: {{command: ...}}`"
    return None


async def run_init(
    steps: list[InitStep], address: str, run: RunCommand, note: Callable[[str], None]
) -> None:
    """Run the steps in order with their retries; raise InitFailed for a failing
    step whose on_failure is ``fail``; ``warn`` notes it, ``continue`` goes on quietly."""
    for step in steps:
        problem = step_problem(step)
        attempts = 1 + (step.retry or 0)
        reason = problem
        if problem is None:
            for attempt in range(attempts):
                reason = await run_step(step, address, run)
                if reason is None:
                    break
                if attempt + 1 < attempts:
                    await asyncio.sleep(min(2.0**attempt, 10.0))
        if reason is None:
            note(f"init step {step.id} done")
            continue
        message = f"init step {step.id} ({step.uses}) failed after {attempts} attempt(s): {reason}"
        if step.on_failure == "fail":
            raise InitFailed(message)
        if step.on_failure == "warn":
            note(message + "; continuing (on_failure: warn)")
