"""``zlayerctl logs`` and ``zlayerctl exec``: reaching into a service's replicas.

Logs are read straight from the files agentd names (``LogPaths``), so
following a busy replica never floods the bus; ``exec`` hands agentd this
terminal's file descriptors and exits with the command's exit code. In a
cluster a replica another node runs is reached through that node
(``shared.cluster.remote``: ``Node1.Logs`` and ``Node1.Exec``), with the same
output and exit codes. Through a node's API (``--host``), logs come from its
NDJSON logs stream and exec from its exec route (``ctl.remote``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

import click

from ctl.client import Client, resolve_deployment
from ctl.output import err_console
from shared import logread
from shared.k8slog import LogLine
from shared.replicas import first_running, select_replicas
from shared.wire.agent import ReplicaInfo
from shared.wire.api import LogLine as WireLogLine

if TYPE_CHECKING:
    from shared.cluster.locate import Placed
    from shared.cluster.remote import NodeReach
    from shared.wire.peer import LogsChunk


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
    from shared.bus import UnavailableError
    from shared.cluster.locate import Unread

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

    # As on the node: a replica whose node does not answer is left out with one warning
    # per node, unless no replica could be read at all.
    unread = Unread()
    shown = []
    for replica in chosen:
        if unread.failed(replica):
            unread.add(replica, UnavailableError(""))
            continue
        try:
            await show(replica, tail, False)
        except UnavailableError as exc:
            unread.add(replica, exc)
            continue
        unread.read += 1
        shown.append(replica)
    if unread.first is not None and not unread.read:
        raise unread.first
    for warning in unread.warnings():
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if follow:
        await asyncio.gather(*(show(replica, 0, True) for replica in shown))


async def _located(
    client: Client, deployment: str, service: str, instance: int | None
) -> tuple[list[Placed], NodeReach]:
    """The replicas meant, on whichever node of the cluster runs each (as the API's routes
    find them: shared.cluster.locate.locate), and how to reach the other nodes."""
    from ctl.client import LocalClient
    from shared.cluster.locate import locate
    from shared.cluster.remote import NodeReach

    assert isinstance(client, LocalClient)
    placed = await locate(client.agent, client.scheduler, deployment, service, instance)
    return placed, NodeReach(client.paths)


async def _node_logs(
    client: Client,
    deployment: str,
    service: str,
    follow: bool,
    tail: int | None,
    instance: int | None,
    timestamps: bool,
) -> None:
    """Each replica's lines, one replica after another, then with ``follow`` new lines from
    all at once: this node's from their files, another node's through it."""
    from shared.bus import UnavailableError
    from shared.cluster.locate import Unread

    placed, reach = await _located(client, deployment, service, instance)
    followers = []
    # A node that does not answer (or left) costs only its replicas' lines: the others
    # are shown, and one warning per such node says what is missing.
    unread = Unread()
    try:
        for one in placed:
            replica = one.replica
            prefix = f"{service}-{replica.instance} | " if len(placed) > 1 else ""
            if not one.here:
                if unread.failed(replica):
                    unread.add(replica, UnavailableError(""))
                    continue
                lines = reach.logs(one, tail, follow)
                try:
                    async for chunk in lines:
                        for sent in chunk.lines:
                            _emit(_as_local(sent), prefix, timestamps)
                        if chunk.caught_up:
                            break
                except UnavailableError as exc:
                    unread.add(replica, exc)
                    continue
                unread.read += 1
                if follow:
                    followers.append(_follow_remote(lines, prefix, timestamps))
                else:
                    await lines.aclose()
                continue
            paths = list(await client.agent.log_paths(replica.id))
            for line in logread.read_lines(paths, tail):
                _emit(line, prefix, timestamps)
            unread.read += 1
            if follow and paths:
                current = paths[-1]
                followers.append(_follow(current, prefix, timestamps, logread.end_offset(current)))
        if unread.first is not None and not unread.read:
            raise unread.first  # nothing could be read: that is an error, not a warning
        for warning in unread.warnings():
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if followers:
            await asyncio.gather(*followers)
    finally:
        for follower in followers:
            follower.close()


async def _follow_remote(chunks: AsyncIterator[LogsChunk], prefix: str, timestamps: bool) -> None:
    from shared.bus import UnavailableError

    try:
        async for chunk in chunks:
            for line in chunk.lines:
                _emit(_as_local(line), prefix, timestamps)
    except UnavailableError as exc:  # that node went away: the others are still followed
        err_console.print(f"[yellow]warning:[/] {exc}", highlight=False)


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
    """Print a service's logs (every replica, or one with --instance).

    In a cluster, the replicas of a node that does not answer are left out with one
    warning naming it; the command fails only when no replica could be read.
    """

    async def run() -> None:
        client = Client()
        target = await resolve_deployment(client, deployment)
        if client.remote:
            await _remote_logs(client, target, service, follow, tail, instance, timestamps)
            return
        if await _print_last_run(client, target, service, tail, timestamps):
            return
        await _node_logs(client, target, service, follow, tail, instance, timestamps)

    from ctl.interrupt import run_following

    run_following(run())


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
        if client.remote:
            replicas = await _chosen(client, target, service, instance)
            running = first_running(replicas, service)
            with _raw_terminal(tty, keep_interrupt=True):
                return await client.agent.exec(running.id, list(command), tty, 0, 1, 2)
        from shared.cluster import locate

        placed, reach = await _located(client, target, service, instance)
        where = locate.first_running(placed, service)
        if not where.here:
            return await _exec_on_node(reach, where, list(command), tty)
        with _raw_terminal(tty, keep_interrupt=True):
            return await client.agent.exec(where.replica.id, list(command), tty, 0, 1, 2)

    sys.stdout.flush()
    raise SystemExit(asyncio.run(run()))


exec_.name = "exec"


def _read_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes]) -> None:
    """This process's stdin into ``queue`` (b"" at its end), in a thread of its own: a
    terminal or a file cannot be watched by the event loop, and a daemon thread blocked in
    read does not hold the exit."""

    def read() -> None:
        while True:
            try:
                data = os.read(0, 64 * 1024)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(queue.put_nowait, data)
            except RuntimeError:  # the command ended and the loop with it
                return
            if not data:
                return

    threading.Thread(target=read, name="stdin", daemon=True).start()


@contextlib.contextmanager
def _raw_terminal(on: bool, *, keep_interrupt: bool = False) -> Iterator[None]:
    """This terminal raw while a command with a terminal of its own runs (``on``), as it
    was afterwards.

    Set with TCSANOW, so keys typed before the command has the terminal are kept and go to
    it once, not flushed or echoed twice. ``keep_interrupt`` is for the hand-over to the
    runtime (a replica on this node), which sets the terminal raw itself once it has it:
    until then ^C still stops zlayerctl (the other signal keys do nothing) and zlayerctl's
    output lines still end as usual. Without it (a replica on another node) every key,
    ^C included, goes to the command, and its output comes already translated by its own
    terminal."""
    if not (on and os.isatty(0)):
        yield
        return
    saved = termios.tcgetattr(0)
    mode = termios.tcgetattr(0)  # iflag, oflag, cflag, lflag, ispeed, ospeed, cc
    mode[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
    mode[2] = mode[2] & ~(termios.CSIZE | termios.PARENB) | termios.CS8
    mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
    if keep_interrupt:
        mode[6][termios.VQUIT] = mode[6][termios.VSUSP] = b"\0"  # only ^C signals
    else:
        mode[1] &= ~termios.OPOST
        mode[3] &= ~termios.ISIG
    mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
    termios.tcsetattr(0, termios.TCSANOW, mode)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def _exec_on_node(reach: NodeReach, placed: Placed, command: list[str], tty: bool) -> int:
    """The command in a replica another node runs: this stdin to it, its output here (with
    ``tty`` this terminal's size and its changes too); its exit code."""
    terminal = tty and os.isatty(0)
    cols, rows = os.get_terminal_size(0) if terminal else (0, 0)
    loop = asyncio.get_running_loop()
    async with reach.exec(placed, command, tty=tty, cols=cols, rows=rows) as run:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        _read_stdin(loop, queue)

        async def pump() -> None:
            while data := await queue.get():
                await run.write(data)
            await run.end_input()

        resizes: set[asyncio.Task[None]] = set()

        def resized() -> None:
            size = os.get_terminal_size(0)
            task = loop.create_task(run.resize(size.columns, size.lines))
            resizes.add(task)
            task.add_done_callback(resizes.discard)

        if terminal:
            loop.add_signal_handler(signal.SIGWINCH, resized)
        sending = asyncio.create_task(pump())
        try:
            with _raw_terminal(terminal):
                async for stream, data in run.output():
                    os.write(2 if stream == "stderr" else 1, data)
        finally:
            sending.cancel()
            if terminal:
                loop.remove_signal_handler(signal.SIGWINCH)
        return run.exit_code if run.exit_code is not None else 1
