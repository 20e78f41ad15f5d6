"""``zlayerctl image``: import, ls, inspect and rm of the images registryd stores on this node."""

from __future__ import annotations

import asyncio
import json
import os

import click

from ctl.client import Client
from ctl.output import fail, format_option, human_size, print_json, short_id
from ctl.registry_cmd import push
from ctl.transfer import Sent
from shared.wire import to_builtins
from shared.wire.registry import ImageDetail, ImageInfo

IMPORT_CALL_USEC = 60 * 60 * 1_000_000  # a multi-gigabyte archive is hashed and unpacked


@click.group()
def image() -> None:
    """Images on this node: import archives, list, inspect, remove."""


@image.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=True, dir_okay=True))
@click.option("--name", "-n", default="", help="name the image (added to the names it carries)")
@format_option
def import_(path: str, name: str, output_format: str) -> None:
    """Import an OCI layout directory, an oci-archive or a `docker save` tar."""

    absolute = os.path.abspath(path)

    async def run() -> ImageInfo:
        client = Client()
        client.bus.method_call_timeout_usec = IMPORT_CALL_USEC
        # Under systemd registryd has its own /tmp and no /home: it may need a copy.
        sent = Sent(client.registry)
        try:
            with sent.speaking_our_paths():
                return await client.registry.import_image(await sent.path(absolute), name)
        finally:
            client.close()

    info = asyncio.run(run())
    if output_format == "json":
        print_json(to_builtins(info))
        return
    names = ", ".join(info.names) if info.names else "no name (give one with --name)"
    click.echo(f"imported {names}: {short_id(info.id)}, {human_size(info.size)}")


@image.command("ls")
@format_option
@click.option("--quiet", "-q", is_flag=True, help="only image ids")
def ls(output_format: str, quiet: bool) -> None:
    """List the images on this node."""
    from ctl import reads

    reads.image_ls(output_format, quiet)


@image.command("inspect")
@click.argument("reference")
@format_option
def inspect(reference: str, output_format: str) -> None:
    """Show an image: names, digests, layers and the config a container starts with."""

    async def run() -> ImageDetail:
        client = Client()
        try:
            return await client.registry.inspect_image(reference)
        finally:
            client.close()

    detail = asyncio.run(run())
    if output_format == "json":
        print_json(to_builtins(detail))
        return
    info, config = detail.image, detail.config
    fields: list[tuple[str, str]] = [
        ("Id", info.id),
        ("Names", ", ".join(info.names) or "<none>"),
        ("Manifest", info.manifest_digest),
        ("Platform", f"{info.os}/{info.architecture}"),
        ("Runtime", info.runtime),
        ("Created", info.created),
        ("Size", human_size(info.size)),
        ("Entrypoint", json.dumps(config.entrypoint) if config.entrypoint else ""),
        ("Cmd", json.dumps(config.cmd) if config.cmd else ""),
        ("Workdir", config.workdir),
        ("User", config.user),
        ("Ports", ", ".join(config.exposed_ports)),
        ("Stop signal", config.stop_signal),
    ]
    width = max(len(key) for key, _ in fields) + 1
    for key, value in fields:
        if value:
            click.echo(f"{key + ':':<{width}} {value}")
    for heading, values in (
        ("Env", config.env),
        ("Labels", [f"{k}={v}" for k, v in sorted(config.labels.items())]),
        ("Layers", info.layers),
    ):
        if values:
            click.echo(f"{heading}:")
            for value in values:
                click.echo(f"  {value}")


@image.command("rm")
@click.argument("references", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True, help="remove every name of an id, even in use")
@format_option
def rm(references: tuple[str, ...], force: bool, output_format: str) -> None:
    """Remove images by name or id; layers other images use are kept."""

    async def run() -> list[tuple[str, list[str] | str]]:
        client = Client()
        results: list[tuple[str, list[str] | str]] = []
        try:
            for reference in references:
                try:
                    removed = await client.registry.remove_image(reference, force)
                except Exception as exc:  # each reference is reported, then the exit code
                    from ctl.errors import explain

                    results.append((reference, explain(exc)))
                    continue
                results.append((reference, list(removed)))
        finally:
            client.close()
        return results

    results = asyncio.run(run())
    errors = [(ref, outcome) for ref, outcome in results if isinstance(outcome, str)]
    if output_format == "json":
        print_json(
            [
                {"reference": ref, "error": outcome}
                if isinstance(outcome, str)
                else {"reference": ref, "removed": outcome}
                for ref, outcome in results
            ]
        )
    else:
        for _ref, outcome in results:
            if isinstance(outcome, str):
                continue
            for item in outcome:
                click.echo(f"deleted {item}" if item.startswith("sha256:") else f"untagged {item}")
    if len(errors) == 1:
        fail(errors[0][1])
    if errors:
        fail("; ".join(message for _, message in errors))


# `image push` lives with the other registry commands; it is registered here.
image.add_command(push)
