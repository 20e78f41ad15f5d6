"""``zlayerctl pull``, ``image push``, ``login``, ``logout``, ``export`` and ``system prune``.

Pulls, pushes and exports are registryd jobs: the command starts one and
waits for its JobRemoved signal, drawing a progress bar per layer (rich)
from the job's Progress meanwhile, on a terminal only.
``pull``, ``image push`` and ``export`` on this node's bus go through the
blocking bus connection of ``shared.busread`` (no asyncio or sdbus, whose
import was most of a warm pull's time); through a node's API (``--host``)
the typed clients of ``ctl.client`` wait instead, with the same output.
zlayerctl runs as the user, so it is what can read the user's Docker and
Podman auth files; it passes registryd only the entry for the registry at
hand (see shared/credentials.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ctl.output import err_console, fail, format_option, human_size, print_json
from shared.wire import decode, to_builtins
from shared.wire.registry import ImageInfo, PushResult

if TYPE_CHECKING:
    from ctl.client import Client
    from shared.busread import BusReader
    from shared.wire.jobs import JobInfo
    from shared.wire.registry import PruneResult

POLICIES = ("always", "newer", "if_not_present", "never")
# as shared.clients.FALLBACK_SECONDS: GetJob after this long without a signal
FALLBACK_SECONDS = 2.0
NOT_FOUND = "org.zlayer.Error.NotFound"  # shared.bus.NotFoundError's name
PROPERTIES = "org.freedesktop.DBus.Properties"


def _auth_for(reference: str) -> str:
    from shared.credentials import user_credential
    from shared.reference import InvalidReferenceError, parse_reference

    try:
        registry = parse_reference(reference.strip()).domain
    except InvalidReferenceError as exc:
        fail(str(exc))
    return user_credential(registry)


def _bars(
    show: bool,
) -> tuple[contextlib.AbstractContextManager[Any], Callable[[JobInfo], None] | None]:
    """The progress display and what draws a job's items on it: rich's bars on a terminal
    when ``show``; otherwise nothing, and rich is not imported."""
    if not (show and err_console.is_terminal):
        return contextlib.nullcontext(), None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[state]}"),
        # a console of its own, as err_console's: the lazy one is no context manager, which Live
        # needs; while the bars are shown Live redirects stderr, so err_console writes above them
        console=Console(stderr=True, soft_wrap=True),
        transient=False,
    )
    bars: dict[str, TaskID] = {}

    def draw(info: JobInfo) -> None:
        for item in info.items:
            if item.name not in bars:
                bars[item.name] = progress.add_task(
                    item.name, total=item.total or None, state=item.state
                )
            progress.update(
                bars[item.name],
                completed=item.done,
                total=item.total or None,
                state=item.state,
            )

    return progress, draw


def _restarted(what: str) -> NoReturn:
    fail(
        f"zlayer-registryd restarted during the {what}; run the command again "
        "(a pull resumes where it stopped)"
    )


async def wait_job(
    client: Client, start: Callable[[], Awaitable[int]], what: str, show: bool
) -> JobInfo:
    """Start a job and wait for its end, with a bar per item on a terminal; its final info.

    ``RegistryClient.run_job`` subscribes to JobRemoved before ``start``
    runs, so a job that ends at once (a warm pull) is not missed. Ctrl-C
    cancels the job.
    """
    import asyncio

    from shared.bus import NotFoundError

    display, draw = _bars(show)
    started: list[int] = []

    async def start_job() -> int:
        job_id = await start()
        started.append(job_id)
        return job_id

    with display:
        try:
            return await client.registry.run_job(start_job, draw)
        except NotFoundError:
            if not started:
                raise  # the start's own refusal: no such image
            _restarted(what)
        except (KeyboardInterrupt, asyncio.CancelledError):
            if started:
                with contextlib.suppress(Exception):
                    await client.registry.cancel_job(started[0])
            raise


def wait_bus_job(
    bus: BusReader, start: Callable[[BusReader], int], what: str, show: bool
) -> JobInfo:
    """``wait_job`` on the blocking bus connection: subscribe to JobRemoved, start the job,
    wait for its end (GetJob after FALLBACK_SECONDS without a signal, as
    ``RegistryClient.run_job``), following its Progress while a bar is shown."""
    from shared.busread import BUS_NAMES, JOB_REMOVED, BusError, Read, object_path
    from shared.wire.jobs import JobInfo, ProgressItem

    display, draw = _bars(show)
    job_id: int | None = None
    with display:
        try:
            # before the job starts: an end that comes at once (a warm pull) is not missed
            signals = bus.subscribe(JOB_REMOVED)
            job_id = start(bus)
            info = bus.get_job(job_id)
            if draw is not None and info.state == "running":
                path = f"{object_path(BUS_NAMES[JOB_REMOVED.daemon])}/job/{job_id}"
                changed = Read(JOB_REMOVED.daemon, "PropertiesChanged", "sa{sv}as", "")
                bus.subscribe(changed, path=path, interface=PROPERTIES, queue=signals)
                draw(bus.get_job(job_id))  # what happened before the match
            while info.state == "running":
                try:
                    member, body = bus.wait(signals, FALLBACK_SECONDS)
                except TimeoutError:
                    info = bus.get_job(job_id)
                    continue
                if member == JOB_REMOVED.member:
                    if body[0] == job_id:
                        info = decode(body[2], JobInfo)
                elif draw is not None and "Progress" in body[1]:
                    info.items = decode(body[1]["Progress"][1], list[ProgressItem])
                    draw(info)
            if draw is not None:
                draw(info)
            return info
        except BusError as exc:
            if job_id is None or exc.name != NOT_FOUND:
                raise  # the start's own refusal (no such image), or the bus's
            _restarted(what)
        except KeyboardInterrupt:
            if job_id is not None:
                with contextlib.suppress(Exception):
                    bus.cancel_job(job_id)
            raise


def _finish(info: JobInfo) -> str:
    if info.state == "done":
        return info.result
    if info.state == "cancelled":
        fail(f"the {info.kind} of {info.target} was cancelled")
    fail(info.error or f"the {info.kind} of {info.target} failed")


def _on_bus() -> bool:
    """Whether the command goes to this node's bus, not to a node's API."""
    from ctl.readargs import is_remote

    return not is_remote()


async def _run_job(start: Callable[[Client], Awaitable[int]], what: str, show: bool) -> str:
    from ctl.client import Client

    client = Client()
    try:
        info = await wait_job(client, partial(start, client), what, show)
    finally:
        client.close()
    return _finish(info)


def _run_bus_job(
    start: Callable[[BusReader], int], what: str, show: bool, fds: bool = False
) -> str:
    from shared.busread import BusReader, bus_address

    with BusReader(bus_address(), enable_fds=fds) as bus:
        info = wait_bus_job(bus, start, what, show)
    return _finish(info)


# ---------------------------------------------------------------- pull and push


@click.command()
@click.argument("image_name", metavar="IMAGE")
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default="always",
    show_default=True,
    help="always ask the registry; newer: keep the local copy if the registry is down; "
    "if_not_present; never",
)
@format_option
def pull(image_name: str, policy: str, output_format: str) -> None:
    """Pull IMAGE from its registry (`nginx` means docker.io/library/nginx:latest)."""
    auth = _auth_for(image_name)
    show = output_format != "json"
    if _on_bus():
        result = _run_bus_job(lambda bus: bus.pull(image_name, policy, auth), "pull", show)
    else:
        import asyncio

        async def start(client: Client) -> int:
            return await client.registry.pull(image_name, policy, auth)

        result = asyncio.run(_run_job(start, "pull", show))
    info = decode(result, ImageInfo)
    if output_format == "json":
        print_json(to_builtins(info))
        return
    name = info.names[0] if info.names else image_name
    click.echo(f"pulled {name}: {info.id}")


@click.command()
@click.argument("image_name", metavar="NAME")
@click.argument("destination", metavar="[DEST]", required=False, default="")
@format_option
def push(image_name: str, destination: str, output_format: str) -> None:
    """Push the image NAME to its registry, or to DEST (registry/repository:tag)."""
    auth = _auth_for(destination or image_name) if (destination or "/" in image_name) else ""

    show = output_format != "json"
    if _on_bus():
        text = _run_bus_job(lambda bus: bus.push(image_name, destination, auth), "push", show)
    else:
        import asyncio

        async def start(client: Client) -> int:
            return await client.registry.push(image_name, destination, auth)

        text = asyncio.run(_run_job(start, "push", show))
    result = decode(text, PushResult)
    if output_format == "json":
        print_json(to_builtins(result))
        return
    click.echo(f"pushed {result.reference}: {result.digest}")


# ---------------------------------------------------------------- login and logout


@click.command()
@click.argument("registry")
@click.option("--username", "-u", default="", help="the user name (asked for when not given)")
@click.option("--password", "-p", default="", help="the password (visible to `ps`; prefer stdin)")
@click.option("--password-stdin", is_flag=True, help="read the password from standard input")
def login(registry: str, username: str, password: str, password_stdin: bool) -> None:
    """Check credentials for REGISTRY and keep them in registryd (a 0600 file)."""
    if password_stdin:
        if password:
            fail("give the password either with --password or on stdin, not both")
        password = sys.stdin.read().rstrip("\r\n")
        if not username:
            fail("--password-stdin needs --username")
    if not username:
        username = click.prompt("Username", err=True)
    if not password:
        password = click.prompt("Password", hide_input=True, err=True)

    import asyncio

    from ctl.client import Client

    async def run() -> str:
        client = Client()
        try:
            return await client.registry.login(registry, username, password)
        finally:
            client.close()

    host = asyncio.run(run())
    click.echo(f"logged in to {host} as {username}")


@click.command()
@click.argument("registry")
def logout(registry: str) -> None:
    """Forget the credentials registryd keeps for REGISTRY."""

    import asyncio

    from ctl.client import Client

    async def run() -> bool:
        client = Client()
        try:
            return await client.registry.logout(registry)
        finally:
            client.close()

    if asyncio.run(run()):
        click.echo(f"logged out of {registry}")
    else:
        click.echo(f"no credentials were kept for {registry}")


# ---------------------------------------------------------------- export


@click.command()
@click.argument("image_name", metavar="IMAGE")
@click.option("--output", "-o", "output", required=True, help="the archive file to write")
@click.option("--gzip", "compress", is_flag=True, help="gzip the whole archive")
def export(image_name: str, output: str, compress: bool) -> None:
    """Write IMAGE to FILE as an oci-archive (`image import` reads it back)."""
    target = Path(output).absolute()
    if target.is_dir():
        fail(f"{target} is a directory; give a file name with -o")
    # Written beside the target and renamed at the end: a failure leaves no half archive.
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror}")
    try:
        if _on_bus():

            def start_on_bus(bus: BusReader) -> int:
                try:
                    return bus.export_image(image_name, fd, compress)
                finally:
                    os.close(fd)  # the daemon holds its own copy

            result = _run_bus_job(start_on_bus, "export", False, fds=True)
        else:
            import asyncio

            async def start(client: Client) -> int:
                try:
                    job_id = await client.registry.export_image(image_name, fd, compress)
                finally:
                    os.close(fd)  # the daemon holds its own copy
                return job_id

            result = asyncio.run(_run_job(start, "export", False))
        os.rename(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    info = decode(result, ImageInfo)
    click.echo(f"exported {', '.join(info.names) or info.id} to {target}")


# ---------------------------------------------------------------- system prune


@click.group()
def system() -> None:
    """Node-wide housekeeping."""


@system.command("prune")
@click.option("--force", "-f", is_flag=True, help="do not ask for confirmation")
@format_option
def prune(force: bool, output_format: str) -> None:
    """Remove images no replica uses, and blobs and layers no image references."""
    if not force:
        click.confirm(
            "This removes every image no replica uses, and their blobs and layers. Continue?",
            abort=True,
            err=True,
        )

    import asyncio

    from ctl.client import Client

    async def run() -> PruneResult:
        client = Client()
        try:
            return await client.registry.prune()
        finally:
            client.close()

    result = asyncio.run(run())
    if output_format == "json":
        print_json(to_builtins(result))
        return
    for name in result.images:
        click.echo(f"removed {name}")
    click.echo(
        f"pruned {len(result.images)} images and {len(result.blobs)} blobs, "
        f"{human_size(result.bytes)} freed"
    )
