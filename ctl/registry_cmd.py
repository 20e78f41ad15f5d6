"""``zlayerctl pull``, ``image push``, ``login``, ``logout``, ``export`` and ``system prune``.

Pulls, pushes and exports are registryd jobs: the command starts one and
waits for its JobRemoved signal, drawing a progress bar per layer (rich)
from the job's Progress meanwhile.
zlayerctl runs as the user, so it is what can read the user's Docker and
Podman auth files; it passes registryd only the entry for the registry at
hand (see shared/credentials.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import click

from ctl.client import Client
from ctl.output import err_console, fail, format_option, human_size, print_json
from shared.bus import NotFoundError
from shared.credentials import user_credential
from shared.reference import InvalidReferenceError, parse_reference
from shared.wire import decode, to_builtins
from shared.wire.jobs import JobInfo
from shared.wire.registry import ImageInfo, PruneResult, PushResult

POLICIES = ("always", "newer", "if_not_present", "never")


def _auth_for(reference: str) -> str:
    try:
        registry = parse_reference(reference.strip()).domain
    except InvalidReferenceError as exc:
        fail(str(exc))
    return user_credential(registry)


async def wait_job(
    client: Client, start: Callable[[], Awaitable[int]], what: str, show: bool
) -> JobInfo:
    """Start a job and wait for its end, with a bar per item on a terminal; its final info.

    ``RegistryClient.run_job`` subscribes to JobRemoved before ``start``
    runs, so a job that ends at once (a warm pull) is not missed. Ctrl-C
    cancels the job.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TransferSpeedColumn,
    )

    shown = show and err_console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[state]}"),
        console=err_console,
        disable=not shown,
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

    started: list[int] = []

    async def start_job() -> int:
        job_id = await start()
        started.append(job_id)
        return job_id

    with progress:
        try:
            return await client.registry.run_job(start_job, draw if shown else None)
        except NotFoundError:
            if not started:
                raise  # the start's own refusal: no such image
            fail(
                f"zlayer-registryd restarted during the {what}; run the command again "
                "(a pull resumes where it stopped)"
            )
        except (KeyboardInterrupt, asyncio.CancelledError):
            if started:
                with contextlib.suppress(Exception):
                    await client.registry.cancel_job(started[0])
            raise


def _finish(info: JobInfo) -> str:
    if info.state == "done":
        return info.result
    if info.state == "cancelled":
        fail(f"the {info.kind} of {info.target} was cancelled")
    fail(info.error or f"the {info.kind} of {info.target} failed")


async def _run_job(start: Callable[[Client], Awaitable[int]], what: str, show: bool) -> str:
    client = Client()
    try:
        info = await wait_job(client, partial(start, client), what, show)
    finally:
        client.close()
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

    async def start(client: Client) -> int:
        return await client.registry.pull(image_name, policy, auth)

    result = asyncio.run(_run_job(start, "pull", output_format != "json"))
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

    async def start(client: Client) -> int:
        return await client.registry.push(image_name, destination, auth)

    result = decode(asyncio.run(_run_job(start, "push", output_format != "json")), PushResult)
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
