"""Deployment commands: up, down, deploy, ps, stop, scale, job.

They read the spec locally first (so a bad file is reported with locations
before anything is sent), send it to schedd with the values of the ``$E:``
variables it names, and show what schedd and agentd report back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, NoReturn, TypeVar

import click

from ctl.output import console, err_console, fail, format_option, print_json, print_rows
from ctl.reads import coloured, print_events, stamp
from ctl.up_background import deployed_line as _deployed_line
from ctl.up_background import read_spec as _read_spec
from ctl.up_background import spec_text as _spec_text
from ctl.up_background import up_in_background as _up_in_background
from ctl.up_background import warnings_of as _warnings_of
from shared.wire import decode, encode, to_builtins
from shared.wire.jobs import JobInfo, ProgressItem
from shared.wire.scheduler import Deployed, DeploymentStatus, Event, replicas_over

if TYPE_CHECKING:
    import asyncio

    from rich.status import Status

    from ctl.client import Client

# asyncio, sdbus and the bus clients load in the commands that use them: `up -b` sends
# its two calls through the blocking bus reader and needs none of them.

DEFAULT_WAIT = 600.0
T = TypeVar("T")


async def _deploy_warnings(client: Client, status: DeploymentStatus) -> list[str]:
    """What schedd warned about when it stored ``status``'s revision (its events)."""
    return _warnings_of(await client.scheduler.list_events(status.name, 200), status)


def _print_event(event: Event) -> None:
    where = f"{event.service}: " if event.service else ""
    err_console.print(f"[dim]{stamp(event.time)}[/] {where}{event.message}", highlight=False)


def _status_lines(status: DeploymentStatus) -> None:
    for svc in status.services:
        count = f"{svc.healthy}/{svc.desired} healthy" if svc.rtype == "service" else svc.rtype
        note = f" - {svc.message}" if svc.message else ""
        err_console.print(f"  {svc.name}: {coloured(svc.state)} {count}{note}", highlight=False)


def _failed_sentence(status: DeploymentStatus) -> str | None:
    """Why ``status`` failed, as schedd's deploy job says it too; None if it has not."""
    name = status.name
    failed = [s for s in status.services if s.state == "failed"]
    if failed:
        return f"{name} failed: {failed[0].name}: {failed[0].message or 'see zlayerctl ps'}"
    if status.state == "failed":  # the deployment as a whole: its traffic was refused
        return f"{name} failed: {status.message or 'see zlayerctl events'}"
    return None


def _not_healthy(status: DeploymentStatus, timeout: float) -> NoReturn:
    _status_lines(status)
    fail(
        f"{status.name} was not healthy after {timeout:.0f}s; "
        "see `zlayerctl ps` and `zlayerctl logs`"
    )


def _schedd_away(exc: BaseException) -> bool:
    """schedd is restarting: not on the bus yet, or it died before it answered."""
    import sdbus

    away = sdbus.DbusServiceUnknownError | sdbus.DbusNameHasNoOwnerError | sdbus.DbusNoReplyError
    return isinstance(exc, away)


async def _when_back(call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """``call``, asked again while schedd is restarting, until ``deadline``."""
    import asyncio

    while True:
        try:
            return await call()
        except Exception as exc:
            if not _schedd_away(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.25)


async def _poll_healthy(client: Client, name: str, timeout: float) -> DeploymentStatus:
    """Poll until every service runs healthy: for a schedd that lost the deploy job."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        status = await _when_back(lambda: client.scheduler.get_deployment(name), deadline)
        sentence = _failed_sentence(status)
        if sentence is not None:
            _status_lines(status)
            fail(sentence)
        if status.state == "running":
            return status
        if time.monotonic() > deadline:
            _not_healthy(status, timeout)
        await asyncio.sleep(0.5)


async def _run_job(
    client: Client,
    start: Callable[[], Awaitable[int]],
    timeout: float,
    on_progress: Callable[[JobInfo], None] | None = None,
) -> tuple[JobInfo | None, float]:
    """Start a schedd job and wait for its end, ``timeout`` counted once it started.

    (its final JobInfo, seconds left); (None, seconds left) when schedd
    lost the job (it restarted: GetJob says NotFound, or it is not back on the
    bus yet) and the caller polls instead. Past ``timeout`` the job is cancelled
    (that stops its waiting only) and (None, 0) is returned.
    """
    import asyncio

    scheduler = client.scheduler
    started = asyncio.Event()
    job_id = 0

    async def begin() -> int:
        nonlocal job_id
        job_id = await start()
        started.set()
        return job_id

    from shared.bus import NotFoundError

    task = asyncio.create_task(scheduler.run_job(begin, on_progress))
    starting = asyncio.create_task(started.wait())
    try:
        await asyncio.wait({task, starting}, return_when=asyncio.FIRST_COMPLETED)
        deadline = time.monotonic() + timeout
        if not task.done():
            await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            with contextlib.suppress(Exception):
                await scheduler.cancel_job(job_id)
            return None, 0.0
        try:
            info = task.result()
        except Exception as exc:
            if not job_id or not (isinstance(exc, NotFoundError) or _schedd_away(exc)):
                raise
            return None, max(0.0, deadline - time.monotonic())
        if info.state == "cancelled":  # somebody else stopped the waiting: poll instead
            return None, max(0.0, deadline - time.monotonic())
        return info, max(0.0, deadline - time.monotonic())
    finally:
        starting.cancel()
        if not task.done():
            task.cancel()


async def _wait_healthy(
    client: Client, start: Callable[[], Awaitable[Deployed]], timeout: float
) -> DeploymentStatus:
    """Deploy with ``start`` and wait until every service runs healthy (schedd's deploy
    job); fail with the reason when one fails or time runs out."""
    name = ""

    async def begin() -> int:
        nonlocal name
        deployed = await start()
        name = deployed.status.name
        return deployed.job

    info, left = await _run_job(client, begin, timeout)
    if info is None:
        if left <= 0:
            _not_healthy(await client.scheduler.get_deployment(name), timeout)
        return await _poll_healthy(client, name, left)
    if info.state == "done":
        return decode(info.result, DeploymentStatus)
    status = await _status_or_none(client, name)
    if status is not None:
        _status_lines(status)
    fail(info.error)


async def _status_or_none(client: Client, name: str) -> DeploymentStatus | None:
    from shared.bus import NotFoundError

    try:
        return await client.scheduler.get_deployment(name)
    except NotFoundError:
        return None


async def _wait_until(
    client: Client,
    name: str,
    progress: Callable[[DeploymentStatus | None], str | None],
    timeout: float,
) -> None:
    """Poll ``name`` until ``progress`` says done (None); show what it says meanwhile.

    On a terminal the line is a spinner that changes in place; elsewhere each
    new line is printed once. Past ``timeout`` the command fails with the last line.
    """
    import asyncio

    deadline = time.monotonic() + timeout
    with _progress_line() as show:
        while True:
            line = progress(await _when_back(lambda: _status_or_none(client, name), deadline))
            if line is None:
                return
            show(line)
            if time.monotonic() > deadline:
                _still(show.last, timeout)
            await asyncio.sleep(0.25)


class _Line:
    """Shows a changing line: a spinner on a terminal, else each new line once."""

    def __init__(self, spinner: Status | None) -> None:
        self.spinner = spinner
        self.last = ""

    def __call__(self, line: str) -> None:
        if line == self.last:
            return
        if self.spinner is not None:
            self.spinner.update(line)
        else:
            err_console.print(f"[dim]{stamp(time.time())}[/] {line}", highlight=False)
        self.last = line


@contextlib.contextmanager
def _progress_line() -> Iterator[_Line]:
    with contextlib.ExitStack() as stack:
        spinner = stack.enter_context(err_console.status("")) if err_console.is_terminal else None
        yield _Line(spinner)


def _still(last: str, timeout: float) -> NoReturn:
    fail(f"{last}, still after {timeout:.0f}s; see `zlayerctl ps --containers`")


async def _wait_job(
    client: Client,
    name: str,
    start: Callable[[], Awaitable[int]],
    job_line: Callable[[ProgressItem], str | None],
    poll_line: Callable[[DeploymentStatus | None], str | None],
    timeout: float,
) -> None:
    """Start a schedd job on ``name`` and wait for its end, showing ``job_line`` of its
    progress item as :func:`_wait_until` shows ``poll_line``; past ``timeout`` fail
    with the last line. Polls with ``poll_line`` when schedd lost the job."""
    with _progress_line() as show:

        def progress(info: JobInfo) -> None:
            item = next((i for i in info.items if i.name == name), None)
            line = None if item is None else job_line(item)
            if line is not None:
                show(line)

        info, left = await _run_job(client, start, timeout, progress)
        if info is None and left <= 0:
            line = poll_line(await _status_or_none(client, name))
            if line is None:
                return
            show(line)
            _still(show.last, timeout)
    if info is None:  # schedd restarted: poll
        await _wait_until(client, name, poll_line, left)
    elif info.state != "done":
        fail(info.error)


async def _wait_removed(client: Client, name: str, timeout: float) -> None:
    """Down ``name`` and wait until it is gone (schedd's down job), showing the replicas
    left as :func:`_wait_until` does; past ``timeout`` fail with the last line."""
    await _wait_job(
        client,
        name,
        lambda: client.scheduler.down(name),
        lambda item: None if item.state == "removed" else f"removing {name}: {item.state}",
        _removal_line,
        timeout,
    )


def _waiting_line(name: str, left: int) -> str | None:
    if left == 0:
        return None
    return f"waiting for {left} replica{'s' if left != 1 else ''} of {name} to stop"


def _stopping_line(status: DeploymentStatus | None, services: set[str], target: int) -> str | None:
    """None once each named service runs ``target`` replicas at most (or the deployment
    is gone); else how far it is."""
    if status is None:
        return None
    return _waiting_line(status.name, replicas_over(status, services, target))


async def _wait_stopped(
    client: Client,
    name: str,
    start: Callable[[], Awaitable[int]],
    services: Callable[[DeploymentStatus | None], set[str]],
    target: int,
    timeout: float,
) -> None:
    """Stop or scale with ``start`` and wait for schedd's job: until each of ``services``
    runs ``target`` replicas at most and none still stops, showing how many are left."""
    await _wait_job(
        client,
        name,
        start,
        lambda item: _waiting_line(name, item.total - item.done),
        lambda st: _stopping_line(st, services(st), target),
        timeout,
    )


async def _follow_events(client: Client, name: str, stop: asyncio.Event) -> None:
    """Print the deployment's events until ``stop`` is set."""
    import asyncio

    scheduler = client.scheduler

    async def printer() -> None:
        async for event in scheduler.events():
            if event.deployment == name:
                _print_event(event)

    task = asyncio.create_task(printer())
    last_line = ""
    try:
        while not stop.is_set():
            status = await scheduler.get_deployment(name)
            line = ", ".join(
                f"{s.name} {s.state} {s.healthy}/{s.desired}"
                for s in status.services
                if s.rtype == "service"
            )
            if line != last_line:
                err_console.print(
                    f"[dim]{stamp(time.time())}[/] [bold]{name}[/] {status.state}: {line}",
                    highlight=False,
                )
                last_line = line
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@click.command()
@click.argument("file", required=False)
@click.option("-b", "background", is_flag=True, help="return as soon as the deployment is stored")
@click.option(
    "-d",
    "detach",
    is_flag=True,
    help="return once every service is healthy (or fail with the reason)",
)
@click.option(
    "--timeout", type=float, default=DEFAULT_WAIT, show_default=True, help="seconds -d waits"
)
def up(file: str | None, background: bool, detach: bool, timeout: float) -> None:
    """Deploy FILE and follow it; Ctrl-C tears the deployment down (-b/-d return instead)."""
    # The spec goes to schedd unread: loading the spec models here would take longer
    # than the deploy. schedd's warnings come back as its events; when it refuses,
    # the file is read here to say what is wrong with it where it is, as before.
    text, filename, host_env = _spec_text(file, "up")
    if background:
        from ctl.contexts import target

        if target() is None:  # this node's bus, not a node's API (--host)
            _up_in_background(file, text, filename, host_env)
            return
    import asyncio
    import signal

    from ctl.client import Client

    deployed = False

    async def run() -> None:
        client = Client()

        async def start() -> Deployed:
            nonlocal deployed
            result = await client.scheduler.deploy(text, filename, host_env)
            deployed = True
            for warning in await _deploy_warnings(client, result.status):
                err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
            _deployed_line(result.status)
            return result

        if detach and not background:
            status = await _wait_healthy(client, start, timeout)
            _status_lines(status)
            err_console.print(f"[green]{status.name} is running[/]", highlight=False)
            return
        status = (await start()).status
        name = status.name
        if background:
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        err_console.print(
            "following events; Ctrl-C stops and removes the deployment", highlight=False
        )
        await _follow_events(client, name, stop)
        err_console.print(f"removing {name} ...", highlight=False)
        await _wait_removed(client, name, DEFAULT_WAIT)
        err_console.print(f"{name} removed", highlight=False)

    try:
        asyncio.run(run())
    except Exception:
        if not deployed:
            _read_spec(file, "up")  # the file's own problems, located; exits 1
        raise


def _removal_line(status: DeploymentStatus | None) -> str | None:
    if status is None:
        return None
    return f"removing {status.name}: {status.message or 'stopping its replicas'}"


@click.command()
@click.argument("name", required=False)
@click.option("--no-wait", is_flag=True, help="return at once; the replicas stop in the background")
@click.option(
    "--timeout", type=float, default=DEFAULT_WAIT, show_default=True, help="seconds to wait"
)
def down(name: str | None, no_wait: bool, timeout: float) -> None:
    """Remove a deployment and everything it runs (named volumes are kept).

    Waits until its replicas are gone, each after its stop grace period.
    """
    import asyncio

    from ctl.client import Client, resolve_deployment

    async def run() -> None:
        client = Client()
        target = await resolve_deployment(client, name)
        if no_wait:
            await client.scheduler.down(target)
            err_console.print(f"removing {target}", highlight=False)
            return
        await _wait_removed(client, target, timeout)
        err_console.print(f"{target} removed", highlight=False)

    asyncio.run(run())


@click.command()
@click.argument("file", required=False)
@click.option("--dry-run", is_flag=True, help="show the plan; run nothing")
@format_option
def deploy(file: str | None, dry_run: bool, output_format: str) -> None:
    """Deploy FILE and return (or show the plan with --dry-run)."""
    import asyncio

    from ctl.client import Client

    text, filename, host_env, name = _read_spec(file, "deploy")

    async def run() -> None:
        client = Client()
        if dry_run:
            plan = await client.scheduler.plan(text, filename, host_env)
            if output_format == "json":
                print_json(to_builtins(plan))
                return
            click.echo(f"revision {plan.revision} of {plan.deployment} would:")
            for action in plan.actions:
                click.echo(f"  {action}")
            return
        status = (await client.scheduler.deploy(text, filename, host_env)).status
        if output_format == "json":
            print_json(to_builtins(status))
        else:
            err_console.print(
                f"deployed revision {status.revision} of [bold]{name}[/]", highlight=False
            )

    asyncio.run(run())


@click.command()
@click.option("-d", "--deployment", help="only this deployment")
@click.option("-n", "--lines", "limit", type=click.IntRange(1, 2000), default=50, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="keep printing new events until Ctrl-C")
@format_option
def events(deployment: str | None, limit: int, follow: bool, output_format: str) -> None:
    """What happened to deployments: deploys, rollouts, scaling decisions, failures."""

    from ctl.client import Client

    if not follow:
        from ctl import reads

        reads.events(deployment, limit, output_format)
        return

    async def run() -> None:
        client = Client()
        print_events(
            await client.scheduler.list_events(deployment or "", limit), deployment, output_format
        )
        async for event in client.scheduler.events():
            if deployment and event.deployment != deployment:
                continue
            if output_format == "json":
                click.echo(encode(event))
            else:
                service = f"{event.service}: " if event.service else ""
                console.print(
                    f"[dim]{stamp(event.time)}[/] [bold]{event.deployment}[/] "
                    f"{service}{event.message}",
                    highlight=False,
                )

    from ctl.interrupt import run_following

    run_following(run())


@click.command()
@click.argument("name", required=False)
@format_option
def rollback(name: str | None, output_format: str) -> None:
    """Return a deployment to its previous revision (rolled out like any deploy)."""
    import asyncio

    from ctl.client import Client, resolve_deployment

    async def run() -> None:
        client = Client()
        target = await resolve_deployment(client, name)
        revision = await client.scheduler.rollback(target)
        if output_format == "json":
            print_json({"deployment": target, "revision": revision})
        else:
            err_console.print(
                f"rolling {target} back: revision {revision} has the previous spec; "
                "`zlayerctl ps` shows the progress",
                highlight=False,
            )

    asyncio.run(run())


@click.command()
@click.option("--containers", is_flag=True, help="one row per replica instead of per service")
@click.option("-d", "--deployment", help="only this deployment")
@format_option
def ps(containers: bool, deployment: str | None, output_format: str) -> None:
    """Show deployments and their services (or replicas with --containers)."""
    from ctl import reads

    reads.ps(containers, deployment, output_format)


@click.command()
@click.argument("name", required=False)
@click.option("--service", "-s", default="", help="only this service")
@click.option(
    "--timeout",
    "-t",
    type=float,
    default=10.0,
    show_default=True,
    help="seconds between the stop signal and KILL",
)
@click.option("--force", is_flag=True, help="KILL at once")
@click.option("--no-wait", is_flag=True, help="return at once; the replicas stop in the background")
def stop(name: str | None, service: str, timeout: float, force: bool, no_wait: bool) -> None:
    """Stop a deployment's replicas (or one service's) and keep the deployment."""
    import asyncio

    from ctl.client import Client, resolve_deployment

    async def run() -> None:
        client = Client()
        target = await resolve_deployment(client, name)
        what = f"{service + ' of ' if service else ''}{target}"
        if no_wait:
            await client.scheduler.stop(target, service, timeout, force)
            err_console.print(f"stopping {what}", highlight=False)
            return
        await _wait_stopped(
            client,
            target,
            lambda: client.scheduler.stop(target, service, timeout, force),
            lambda st: {service} if service else {s.name for s in st.services} if st else set(),
            0,
            timeout + DEFAULT_WAIT,
        )
        err_console.print(f"stopped {what}", highlight=False)

    asyncio.run(run())


@click.command()
@click.argument("service")
@click.argument("replicas", type=click.IntRange(0, 1000))
@click.option("-d", "--deployment", help="the deployment (default: the spec here, or the only one)")
@click.option(
    "--no-wait", is_flag=True, help="return at once; replicas start or stop in the background"
)
def scale(service: str, replicas: int, deployment: str | None, no_wait: bool) -> None:
    """Hold SERVICE at REPLICAS replicas until the next deploy.

    Waits until the surplus replicas of a scale-down have stopped.
    """
    import asyncio

    from ctl.client import Client, resolve_deployment

    async def run() -> None:
        client = Client()
        target = await resolve_deployment(client, deployment)
        if no_wait:
            await client.scheduler.scale(target, service, replicas)
        else:
            await _wait_stopped(
                client,
                target,
                lambda: client.scheduler.scale(target, service, replicas),
                lambda st: {service},
                replicas,
                DEFAULT_WAIT,
            )
        err_console.print(f"scaled {service} of {target} to {replicas}", highlight=False)

    asyncio.run(run())


@click.group()
def job() -> None:
    """Run jobs and see their runs and cron schedules."""


@job.command("trigger")
@click.argument("service")
@click.option("-d", "--deployment", help="the deployment (default: the spec here, or the only one)")
@click.option("--wait", "-w", is_flag=True, help="wait for the run to end; exit with its exit code")
@format_option
def job_trigger(service: str, deployment: str | None, wait: bool, output_format: str) -> None:
    """Start a run of a job (or cron job) now."""
    import asyncio

    from ctl.client import Client, resolve_deployment

    async def run() -> None:
        client = Client()
        target = await resolve_deployment(client, deployment)
        started = await client.scheduler.trigger_job(target, service)
        result = started
        while wait and result.state == "running":
            await asyncio.sleep(0.3)
            runs = await client.agent.list_job_runs(target, service)
            result = next((r for r in runs if r.id == started.id), result)
        if output_format == "json":
            print_json(to_builtins(result))
        else:
            exit_note = f", exit code {result.exit_code}" if result.exit_code is not None else ""
            err_console.print(
                f"run {result.id} of {service}: {coloured(result.state)}{exit_note}",
                highlight=False,
            )
        if wait and result.state == "failed":
            if result.exit_code is None:
                # It never ran: the reason is the run's message (no image, init failed, ...).
                fail(f"run {result.id} of {service} did not start: {result.message}")
            raise SystemExit(result.exit_code or 1)

    asyncio.run(run())


@job.command("status")
@click.argument("service", required=False, default="")
@click.option("-d", "--deployment", help="the deployment (default: the spec here, or the only one)")
@format_option
def job_status(service: str, deployment: str | None, output_format: str) -> None:
    """Show the runs of jobs and cron jobs, newest first."""
    import asyncio

    from ctl.client import Client, resolve_deployment

    async def run() -> None:
        client = Client()
        target = await resolve_deployment(client, deployment)
        runs = await client.agent.list_job_runs(target, service)
        print_rows(
            output_format,
            runs,
            ["RUN", "SERVICE", "TRIGGER", "STATE", "EXIT", "STARTED", "DURATION", "MESSAGE"],
            lambda r: [
                r.id,
                r.service,
                r.trigger,
                coloured(r.state),
                "" if r.exit_code is None else r.exit_code,
                stamp(r.started_at),
                f"{(r.finished_at or time.time()) - r.started_at:.1f}s",
                r.message,
            ],
        )

    asyncio.run(run())


@job.group("cron")
def cron() -> None:
    """Cron jobs."""


@cron.command("ls")
@click.option("-d", "--deployment", default="", help="only this deployment")
@format_option
def cron_ls(deployment: str, output_format: str) -> None:
    """List cron jobs with their schedule and next run."""
    import asyncio

    from ctl.client import Client

    async def run() -> None:
        client = Client()
        rows = await client.scheduler.list_cron(deployment)
        print_rows(
            output_format,
            rows,
            ["DEPLOYMENT", "SERVICE", "SCHEDULE", "ENABLED", "NEXT RUN", "LAST RUN"],
            lambda r: [
                r.deployment,
                r.service,
                r.schedule,
                "yes" if r.enabled else "no",
                stamp(r.next_run) if r.next_run else "",
                stamp(r.last_run) if r.last_run else "",
            ],
        )

    asyncio.run(run())
