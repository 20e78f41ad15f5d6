"""``zlayerctl wasm``: build, validate and inspect WebAssembly binaries, export and push them.

``validate``, ``info`` and ``export`` work on the file here, with no daemon
(like ``zlayerctl validate`` for specs), and ``export`` writes as the user;
``build`` runs a toolchain here (componentize-py for Python, clang with
wasi-libc for C) as the user;
``push`` asks registryd, which owns registry traffic and credentials.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from ctl.client import Client
from ctl.output import fail, format_option, print_json, print_table, short_id
from ctl.transfer import Sent
from shared.bus import NotFoundError
from shared.wasm import (
    WasmError,
    WasmInfo,
    inspect_file,
    read_file,
    validate,
)
from shared.wire import decode, to_builtins
from shared.wire.jobs import JobInfo
from shared.wire.registry import ImageInfo, WasmArtifact, WasmKind

PUSH_WAIT_SEC = 30 * 60.0


def _validated(path: str, kind: str | None) -> WasmInfo:
    expect: WasmKind | None = None
    if kind == "module":
        expect = "module"
    elif kind == "component":
        expect = "component"
    try:
        return validate(read_file(Path(path)), path, expect)
    except WasmError as exc:
        fail(str(exc))


@click.group()
def wasm() -> None:
    """WebAssembly binaries: build, validate, inspect, export and push as OCI artifacts."""


@wasm.command("validate")
@click.argument("file", type=click.Path())
@click.option(
    "--kind",
    type=click.Choice(["module", "component"]),
    default=None,
    help="fail unless FILE is this kind",
)
@format_option
def validate_(file: str, kind: str | None, output_format: str) -> None:
    """Check that FILE is valid WebAssembly (wasmtime validates it)."""
    info = _validated(file, kind)
    if output_format == "json":
        print_json({"file": file, "valid": True, **to_builtins(info)})
        return
    click.echo(f"{file}: valid {info.summary()}")


@wasm.command("info")
@click.argument("file", type=click.Path())
@format_option
def info(file: str, output_format: str) -> None:
    """Show what FILE is: module or component, its imports and exports, its WASI version."""
    try:
        found = inspect_file(Path(file))
    except WasmError as exc:
        fail(str(exc))
    if output_format == "json":
        print_json({"file": file, **to_builtins(found)})
        return
    wasi = (
        found.wasi if found.wasi == "none" else f"{found.wasi} ({', '.join(found.wasi_interfaces)})"
    )
    fields = [
        ("File", file),
        ("Kind", f"{found.kind} (binary version {found.binary_version})"),
        ("Size", f"{found.size} bytes"),
        ("Digest", found.digest),
        ("WASI", wasi),
    ]
    if found.kind == "module":
        fields.append(("Functions", str(found.functions)))
    else:
        fields.append(("Core modules", str(found.core_modules)))
    if found.custom_sections:
        fields.append(("Custom", ", ".join(found.custom_sections)))
    width = max(len(key) for key, _ in fields) + 1
    for key, value in fields:
        click.echo(f"{key + ':':<{width}} {value}")
    rows: list[list[Any]] = []
    for item in found.imports:
        name = f"{item.module}.{item.name}" if item.module else item.name
        rows.append(["import", name, item.kind, item.type])
    for export in found.exports:
        rows.append(["export", export.name, export.kind, export.type])
    if rows:
        click.echo("")
        print_table(["DIRECTION", "NAME", "KIND", "TYPE"], rows)


def _absolute_existing(path: str) -> str:
    absolute = os.path.abspath(path)
    if not os.path.isfile(absolute):
        fail(f"{path} does not exist" if not os.path.exists(absolute) else f"{path} is not a file")
    return absolute


def _default_output(file: str) -> str:
    stem = Path(file).name.removesuffix(".wasm") or "artifact"
    return f"{stem}.oci"


@wasm.command("export")
@click.argument("file", type=click.Path())
@click.option("--name", "-n", required=True, help="the image name, e.g. registry.example/hello:1")
@click.option(
    "--output",
    "-o",
    default=None,
    help="the OCI layout directory to write (absent or empty) [default: FILE's name + .oci]",
)
@click.option("--author", default="", help="the config's author field")
@format_option
def export(file: str, name: str, output: str | None, author: str, output_format: str) -> None:
    """Pack FILE as an OCI artifact (CNCF Wasm layout) in an OCI layout directory.

    The directory imports with `zlayerctl image import DIR`, and any OCI tool
    (skopeo, oras) can copy it to a registry.
    """
    from shared.wasm_artifact import export_layout

    absolute = _absolute_existing(file)
    target = os.path.abspath(output or _default_output(file))
    try:
        artifact = export_layout(absolute, name, target, author)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc}")
    if output_format == "json":
        print_json(to_builtins(artifact))
        return
    click.echo(
        f"exported {artifact.name} ({artifact.kind}, {artifact.os}) to {artifact.location}: "
        f"manifest {artifact.manifest_digest}"
    )


async def _run_job(client: Client, start: Callable[[], Awaitable[int]], timeout: float) -> JobInfo:
    """Start a job and wait for its end; Ctrl-C cancels it.

    ``RegistryClient.run_job`` subscribes to JobRemoved before ``start``
    runs, so a job that ends at once is not missed.
    """
    started: list[int] = []

    async def start_job() -> int:
        job_id = await start()
        started.append(job_id)
        return job_id

    try:
        return await asyncio.wait_for(client.registry.run_job(start_job), timeout)
    except NotFoundError:
        if not started:
            raise  # the start's own refusal
        fail(f"zlayer-registryd restarted while job {started[0]} ran; run the command again")
    except TimeoutError:
        if not started:
            raise
        fail(f"job {started[0]} did not finish in {timeout:.0f} seconds; it goes on in registryd")
    except (KeyboardInterrupt, asyncio.CancelledError):
        if started:
            await client.registry.cancel_job(started[0])
        raise


@wasm.command("push")
@click.argument("file", type=click.Path())
@click.argument("reference")
@click.option(
    "--tls-verify/--no-tls-verify",
    default=True,
    show_default=True,
    help="require HTTPS with a trusted certificate (--no-tls-verify for a plain-HTTP registry)",
)
@format_option
def push(file: str, reference: str, tls_verify: bool, output_format: str) -> None:
    """Push FILE to a registry as a Wasm OCI artifact named REFERENCE."""
    absolute = _absolute_existing(file)

    async def run() -> JobInfo:
        client = Client()
        try:
            # Under systemd registryd has its own /tmp and no /home: it may need a copy.
            sent = Sent(client.registry)
            with sent.speaking_our_paths():
                theirs = await sent.path(absolute)

            async def start() -> int:
                with sent.speaking_our_paths():
                    return await client.registry.push_wasm(theirs, reference, "", tls_verify)

            return await _run_job(client, start, PUSH_WAIT_SEC)
        finally:
            client.close()

    job = asyncio.run(run())
    if job.state != "done":
        fail(job.error or f"the push {job.state}")
    artifact = decode(job.result, WasmArtifact)
    if output_format == "json":
        print_json(to_builtins(artifact))
        return
    click.echo(
        f"pushed {artifact.location} ({artifact.kind}, {artifact.os}): {artifact.manifest_digest}"
    )


@wasm.command("build")
@click.argument("directory", default=".", type=click.Path())
@click.option("--language", "-l", default=None, help="python or c [default: from the files]")
@click.option("--world", "-w", default=None, help="Python: the WIT world [default: the only one]")
@click.option("--wit", default=None, help="Python: the WIT directory [default: DIRECTORY/wit]")
@click.option("--module", "-m", default=None, help="Python: the module [default: app]")
@click.option(
    "--output", "-o", default=None, help="the file to write [default: DIRECTORY's name + .wasm]"
)
@click.option(
    "--zimagefile",
    "-z",
    default=None,
    help="a `wasm:` ZImagefile elsewhere [default: DIRECTORY/ZImagefile, if there is one]",
)
@click.option(
    "--export",
    "image_name",
    default=None,
    help="also pack it as an OCI artifact with this image name, e.g. localhost/hello:1",
)
@click.option(
    "--layout",
    default=None,
    help="with --export: the OCI layout directory to write [default: the output's name + .oci]",
)
@click.option(
    "--import",
    "import_image",
    is_flag=True,
    help="with --export: import the artifact into this node's images (no layout is kept)",
)
@format_option
def build(
    directory: str,
    language: str | None,
    world: str | None,
    wit: str | None,
    module: str | None,
    output: str | None,
    zimagefile: str | None,
    image_name: str | None,
    layout: str | None,
    import_image: bool,
    output_format: str,
) -> None:
    """Build the sources in DIRECTORY into a WebAssembly component or module.

    Settings not given here come from a `wasm:` ZImagefile in DIRECTORY
    (language, wit, output, target). Python builds with componentize-py into
    a WASI preview2 component; C (the directory's .c files) with clang and
    wasi-libc into a WASI preview1 command module.
    With --export NAME it is also packed as `wasm export` does, and with
    --import imported as `image import` does.
    """
    from shared.buildfile.wasm import WasmBuildError, plan
    from shared.buildfile.wasm import build as run_build

    if (layout or import_image) and not image_name:
        fail("--layout and --import go with --export NAME; add it")
    if layout and import_image:
        fail("--import keeps no layout; use --layout or --import, not both")
    try:
        job = plan(directory, language, world, wit, module, output, zimagefile)
        for note in job.notes:
            click.echo(f"note: {note}", err=True)
        built = run_build(job)
    except WasmBuildError as exc:
        fail(str(exc))
    found = _validated(str(built), None)
    result: dict[str, Any] = {"file": str(built), **to_builtins(found)}
    exports = ", ".join(export.name for export in found.exports) or "nothing"
    lines = [f"built {built}: {found.summary()}; its exports: {exports}"]
    if image_name:
        if import_image:
            image = _import_built(str(built), image_name)
            result["image"] = to_builtins(image)
            lines.append(f"imported {', '.join(image.names)}: {short_id(image.id)}")
        else:
            target = os.path.abspath(layout or _default_output(str(built)))
            artifact = _export_built(str(built), image_name, target)
            result["artifact"] = to_builtins(artifact)
            lines.append(
                f"exported {artifact.name} to {artifact.location}: "
                f"manifest {artifact.manifest_digest}"
            )
    if output_format == "json":
        print_json(result)
        return
    for line in lines:
        click.echo(line)


def _export_built(file: str, name: str, target: str) -> WasmArtifact:
    from shared.wasm_artifact import export_layout

    try:
        return export_layout(file, name, target, "")
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc}")


def _import_built(file: str, name: str) -> ImageInfo:
    """Pack into a layout of our own and import it, as `wasm export` + `image import`."""
    import tempfile

    from ctl.image_cmd import IMPORT_CALL_USEC

    with tempfile.TemporaryDirectory(prefix="zlayer-wasm-") as work:
        target = os.path.join(work, "layout")
        _export_built(file, name, target)

        async def run() -> ImageInfo:
            client = Client()
            client.bus.method_call_timeout_usec = IMPORT_CALL_USEC
            try:
                # Under systemd registryd has its own /tmp: Sent copies the layout when it must.
                sent = Sent(client.registry)
                with sent.speaking_our_paths():
                    return await client.registry.import_image(await sent.path(target), name)
            finally:
                client.close()

        return asyncio.run(run())
