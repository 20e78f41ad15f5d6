"""``zlayerctl logs`` and ``zlayerctl exec``: reaching into a service's replicas.

Logs are read straight from the files agentd names (``LogPaths``), so
following a busy replica never floods the bus; ``exec`` hands agentd this
terminal's file descriptors and exits with the command's exit code. Through a
node's API (``--host``), logs come from its NDJSON logs stream and exec from
its exec route (``ctl.remote``), with the same output and exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import datetime

import click

from ctl.client import Client, resolve_deployment
from ctl.output import err_console
from shared import logread
from shared.k8slog import LogLine
from shared.replicas import first_running, select_replicas
from shared.wire.agent import ReplicaInfo
from shared.wire.api import LogLine as WireLogLine


async def _chosen(
    client: Client, deployment: str, service: str, instance: int | None
) -> list[ReplicaInfo]:
    """The replicas the command means (shared.replicas: as the API's routes pick them)."""
    replicas = await client.agent.list_replicas(deployment, service)
    return select_replicas(replicas, deployment, service, instance)


async def _print_last_run(
    client: Client, deployment: str, service: str, tail: int | None, timestamps: bool
) -> bool:
    """A job with no run going: print its last run's kept output; False otherwise."""
    if await client.agent.list_replicas(deployment, service):
        return False
    runs = await client.agent.list_job_runs(deployment, service)
    if not runs:
        return False
    last = runs[0]  # newest first
    paths = list(await client.agent.log_paths(f"{deployment}-{service}-{last.id}"))
    err_console.print(
        f"[dim]run {last.id} ({last.trigger}, {last.state}"
        f"{'' if last.exit_code is None else f', exit code {last.exit_code}'})[/]",
        highlight=False,
    )
    for line in logread.read_lines(paths, tail):
        _emit(line, "", timestamps)
    return True


def _emit(line: LogLine, prefix: str, timestamps: bool) -> None:
    stamp = f"{line.time.isoformat(timespec='milliseconds')} " if timestamps and line.time else ""
    out = sys.stderr if line.stream == "stderr" else sys.stdout
    out.write(f"{prefix}{stamp}{line.text}\n")
    out.flush()


async def _follow(path: str, prefix: str, timestamps: bool, offset: int) -> None:
    """Print what is appended to ``path`` (shared.logread follows rotations)."""
    async for line in logread.follow(path, offset):
        _emit(line, prefix, timestamps)


async def _remote_logs(
    client: Client,
    deployment: str,
    service: str,
    follow: bool,
    tail: int | None,
    instance: int | None,
    timestamps: bool,
) -> None:
    """``logs`` through a node's API: each replica's lines as the local path prints them
    (one replica after another), then, with ``follow``, new lines from all at once."""
    from ctl.remote import RemoteClient

    assert isinstance(client, RemoteClient)
    agent = client.agent
    if not await agent.list_replicas(deployment, service):
        runs = await agent.list_job_runs(deployment, service)
        if runs:  # a job with no run going: its last run's output (apid picks it too)
            last = runs[0]
            err_console.print(
                f"[dim]run {last.id} ({last.trigger}, {last.state}"
                f"{'' if last.exit_code is None else f', exit code {last.exit_code}'})[/]",
                highlight=False,
            )
            async for line in agent.logs(deployment, service, tail=tail):
                _emit(_as_local(line), "", timestamps)
            return
    chosen = await _chosen(client, deployment, service, instance)

    async def show(replica: ReplicaInfo, lines: int | None, follow_it: bool) -> None:
        prefix = f"{service}-{replica.instance} | " if len(chosen) > 1 else ""
        async for line in agent.logs(
            deployment, service, replica=replica.id, tail=lines, follow=follow_it
        ):
            _emit(_as_local(line), prefix, timestamps)

    for replica in chosen:
        await show(replica, tail, False)
    if follow:
        await asyncio.gather(*(show(replica, 0, True) for replica in chosen))


def _as_local(line: WireLogLine) -> LogLine:
    """A line of the API's logs stream as the log files give it (its time in this zone)."""
    when = None if line.time is None else datetime.fromtimestamp(line.time).astimezone()
    return LogLine(when, line.stream, line.line)


@click.command()
@click.argument("service")
@click.option("-d", "--deployment", help="the deployment (default: the spec here, or the only one)")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.option("-n", "--tail", "tail", type=int, default=None, help="only the last N lines")
@click.option("--instance", type=int, default=None, help="only this replica (1, 2, ...)")
@click.option("-t", "--timestamps", is_flag=True, help="show when each line was written")
def logs(
    service: str,
    deployment: str | None,
    follow: bool,
    tail: int | None,
    instance: int | None,
    timestamps: bool,
) -> None:
    """Print a service's logs (every replica, or one with --instance)."""

    async def run() -> None:
        client = Client()
        target = await resolve_deployment(client, deployment)
        if client.remote:
            await _remote_logs(client, target, service, follow, tail, instance, timestamps)
            return
        if await _print_last_run(client, target, service, tail, timestamps):
            return
        chosen = await _chosen(client, target, service, instance)
        followers = []
        for replica in chosen:
            paths = list(await client.agent.log_paths(replica.id))
            prefix = f"{service}-{replica.instance} | " if len(chosen) > 1 else ""
            for line in logread.read_lines(paths, tail):
                _emit(line, prefix, timestamps)
            if follow and paths:
                current = paths[-1]
                followers.append(_follow(current, prefix, timestamps, logread.end_offset(current)))
        if followers:
            await asyncio.gather(*followers)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("service")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-d", "--deployment", help="the deployment (default: the spec here, or the only one)")
@click.option(
    "--replica", "instance", type=int, default=None, help="which replica (default: the first)"
)
@click.option("-t", "--tty", is_flag=True, help="give the command a terminal")
def exec_(
    service: str, command: tuple[str, ...], deployment: str | None, instance: int | None, tty: bool
) -> None:
    """Run COMMAND in a replica of SERVICE: zlayerctl exec web -- ls /"""

    async def run() -> int:
        client = Client()
        target = await resolve_deployment(client, deployment)
        replicas = await _chosen(client, target, service, instance)
        running = first_running(replicas, service)
        return await client.agent.exec(running.id, list(command), tty, 0, 1, 2)

    sys.stdout.flush()
    raise SystemExit(asyncio.run(run()))


exec_.name = "exec"
