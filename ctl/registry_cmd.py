"""``zlayerctl pull``, ``image push``, ``login``, ``logout``, ``export`` and ``system prune``.

The click commands; what pull, push and export do (registryd jobs, waited
for on the blocking bus connection or through a node's API) is in
``ctl.registry_jobs``.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ctl import registry_jobs
from ctl.output import fail, format_option, human_size, print_json
from ctl.registry_jobs import POLICIES
from shared.wire import decode, to_builtins
from shared.wire.registry import ImageInfo

if TYPE_CHECKING:
    from ctl.client import Client
    from shared.busread import BusReader
    from shared.wire.registry import PruneResult


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
    registry_jobs.pull(image_name, policy, output_format)


@click.command()
@click.argument("image_name", metavar="NAME")
@click.argument("destination", metavar="[DEST]", required=False, default="")
@format_option
def push(image_name: str, destination: str, output_format: str) -> None:
    """Push the image NAME to its registry, or to DEST (registry/repository:tag)."""
    registry_jobs.push(image_name, destination, output_format)


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
        if registry_jobs.on_bus():

            def start_on_bus(bus: BusReader) -> int:
                try:
                    return bus.export_image(image_name, fd, compress)
                finally:
                    os.close(fd)  # the daemon holds its own copy

            result = registry_jobs.run_bus_job(start_on_bus, "export", False, fds=True)
        else:
            import asyncio

            async def start(client: Client) -> int:
                try:
                    job_id = await client.registry.export_image(image_name, fd, compress)
                finally:
                    os.close(fd)  # the daemon holds its own copy
                return job_id

            result = asyncio.run(registry_jobs.run_job(start, "export", False))
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
