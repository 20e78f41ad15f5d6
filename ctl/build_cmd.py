"""``zlayerctl build``, ``zlayerctl pipeline`` and ``zlayerctl runtimes``.

A build is a zlayer-registryd job (``Registry1.Build``): this command sends
the request, then follows the job's log file like ``tail -f`` until the job
ends (its JobRemoved signal), and prints the stored image's id or the
failure's one sentence. The daemon reads the context and files itself where
it can see them; where it cannot (under systemd it has its own /tmp and no
/home) they are sent to it first (ctl/transfer.py).

A `wasm:` ZImagefile is built here instead, by the toolchain of
``zlayerctl wasm build`` (it runs as the user, who installed it), and the
module is imported into registryd's store under each tag, as ``zlayerctl
wasm build --export NAME --import`` does.

A pipeline is read and checked here (variables, dependencies, files) before
anything builds; its images are then built wave by wave, the images of a
wave in parallel, their log lines prefixed with the image's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from dataclasses import replace as replace_dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from ctl.client import Client
from ctl.output import fail, format_option, print_json, print_table, short_id
from ctl.transfer import Sent
from shared.bus import NotFoundError
from shared.credentials import user_credential
from shared.reference import InvalidReferenceError, parse_reference
from shared.wire import decode, replace, to_builtins
from shared.wire.jobs import JobInfo
from shared.wire.registry import (
    RUNTIME_AUTO,
    BuildRequest,
    BuildResult,
    ImageInfo,
    PushResult,
)

if TYPE_CHECKING:
    from shared.buildfile.pipeline import Pipeline, PlannedImage

# The format modules (YAML, the spec's error types) load only when a command
# needs them, so every other zlayerctl command starts as fast as before.

POLL_SECONDS = 0.2  # how often a running job's log file is read
PIPELINE_FILES = ("ZPipeline.yaml", "ZPipeline.yml")


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            fail(f"{option} {value}: write it as KEY=VALUE")
        result[key] = rest
    return result


# ---------------------------------------------------------------- following jobs


@dataclass
class _Followed:
    """A job being followed: how it starts, and where its log has been read to."""

    start: Callable[[], Awaitable[int]]  # starts the job; its id
    prefix: str = ""
    job_id: int | None = None  # once started
    position: int = 0
    partial: bytes = b""
    info: JobInfo | None = None
    log_path: str = ""
    done: bool = False
    sent: Sent | None = None  # registryd's copies of our paths, if any

    def seen(self, info: JobInfo) -> None:
        """What registryd says of the job (its log file among it)."""
        self.info = info
        self.log_path = info.log_path

    def drain(self, out: IO[str], final: bool) -> None:
        if not self.log_path:
            return
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.position)
                data = handle.read()
        except OSError:
            return
        self.position += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = b"" if final else lines.pop()
        for line in lines:
            if line or not final:
                text = line.decode(errors="replace")
                out.write(self.prefix + (self.sent.ours(text) if self.sent else text) + "\n")
        out.flush()


async def _start_in_turn(job: _Followed, started: asyncio.Event) -> int:
    try:
        job.job_id = await job.start()
    finally:
        started.set()
    return job.job_id


async def _start_all(
    client: Client, followed: list[_Followed], runs: list[asyncio.Task[JobInfo]]
) -> None:
    """Start the jobs one after the other, each waited on (in ``runs``) from before it starts.

    ``RegistryClient.run_job`` subscribes to JobRemoved before it calls the
    start, so a job that ends at once is not missed; a start that fails
    raises here.
    """
    for job in followed:
        started = asyncio.Event()
        run = asyncio.create_task(
            client.registry.run_job(partial(_start_in_turn, job, started), job.seen)
        )
        runs.append(run)
        waiting = asyncio.create_task(started.wait())
        try:
            await asyncio.wait([run, waiting], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if job.job_id is None:  # the start failed (or the bus did, before it)
            await run  # raises what failed


async def follow_jobs(client: Client, followed: list[_Followed], out: IO[str]) -> list[JobInfo]:
    """Start the jobs, print each one's log as it grows until every job ends; Ctrl-C cancels them.

    A job's end comes with its JobRemoved signal; GetJob is asked only when
    no signal comes (``RegistryClient.run_job``).
    """
    runs: list[asyncio.Task[JobInfo]] = []
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    interrupt = asyncio.create_task(interrupted.wait())
    cancelled = False
    try:
        await _start_all(client, followed, runs)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, interrupted.set)
        while True:
            for job, run in zip(followed, runs, strict=True):
                if job.done:
                    continue
                if run.done():
                    try:
                        job.seen(run.result())
                    except NotFoundError:
                        fail("zlayer-registryd restarted during the build; run the command again")
                    job.drain(out, final=True)
                    job.done = True
                else:
                    job.drain(out, final=False)
            if all(job.done for job in followed):
                return [job.info for job in followed if job.info is not None]
            if interrupted.is_set() and not cancelled:
                cancelled = True
                for job in followed:
                    if not job.done and job.job_id is not None:
                        with contextlib.suppress(Exception):
                            await client.registry.cancel_job(job.job_id)
            waited: set[asyncio.Future[Any]] = {run for run in runs if not run.done()}
            if not interrupted.is_set():
                waited.add(interrupt)
            await asyncio.wait(waited, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        interrupt.cancel()
        for run in runs:
            run.cancel()  # only those still waiting: the command ends without them
        await asyncio.gather(interrupt, *runs, return_exceptions=True)


def _outcome(info: JobInfo, what: str, sent: Sent | None) -> BuildResult | str:
    if info.state == "done":
        return decode(info.result, BuildResult)
    if info.state == "cancelled":
        return f"the build of {what} was cancelled"
    error = sent.ours(info.error) if sent else info.error
    return error or f"the build of {what} failed"


def _build(client: Client, request: BuildRequest, prefix: str = "") -> _Followed:
    """A build to start, first sending registryd the paths it cannot see (ctl/transfer.py)."""
    sent = Sent(client.registry)

    async def start() -> int:
        with sent.speaking_our_paths():
            sendable = replace(
                request,
                **{
                    key: await sent.path(value)
                    for key in ("context", "dockerfile", "zimagefile")
                    if (value := getattr(request, key))
                },
            )
            return await client.registry.build(sendable)

    return _Followed(start, prefix=prefix, sent=sent)


# ---------------------------------------------------------------- pushing


async def _push_all(client: Client, tags: list[str], out: IO[str]) -> list[PushResult]:
    """Push each tag with registryd's registry client; stop at the first failure."""
    pushed: list[PushResult] = []
    for tag in tags:
        out.write(f"pushing {tag}\n")
        auth = user_credential(parse_reference(tag).domain)
        start = partial(client.registry.push, tag, "", auth)
        (info,) = await follow_jobs(client, [_Followed(start)], out)
        if info.state != "done":
            fail(info.error or f"the push of {tag} failed")
        pushed.append(decode(info.result, PushResult))
    return pushed


def _check_tags(tags: list[str], push: bool) -> None:
    for tag in tags:
        try:
            parse_reference(tag)
        except InvalidReferenceError as exc:
            fail(str(exc))
    if push and not tags:
        fail("--push needs a name to push to; give one with -t")


# ---------------------------------------------------------------- build


@click.command("build")
@click.argument("context", default=".", type=click.Path(file_okay=False))
@click.option("-t", "--tag", "tags", multiple=True, help="name the image (repeatable)")
@click.option("-f", "--file", "dockerfile", default="", help="the Dockerfile to build")
@click.option("-z", "--zimagefile", default="", help="the ZImagefile to build")
@click.option("--build-arg", "build_args", multiple=True, help="KEY=VALUE (repeatable)")
@click.option("--target", default="", help="build up to this stage")
@click.option("--runtime", default="", help="build with a runtime template (see `runtimes`)")
@click.option("--runtime-auto", is_flag=True, help="pick a runtime template from the files")
@click.option("--no-cache", is_flag=True, help="rebuild every step")
@click.option(
    "--image-format",
    type=click.Choice(["oci", "docker"]),
    default="oci",
    show_default=True,
    help="docker keeps HEALTHCHECK",
)
@click.option("--push", is_flag=True, help="push each tag after the build")
@format_option
def build(
    context: str,
    tags: tuple[str, ...],
    dockerfile: str,
    zimagefile: str,
    build_args: tuple[str, ...],
    target: str,
    runtime: str,
    runtime_auto: bool,
    no_cache: bool,
    image_format: str,
    push: bool,
    output_format: str,
) -> None:
    """Build an image from CONTEXT (default: here) and store it under each -t name.

    What is built: --runtime/--runtime-auto, else -z, else -f, else the
    context's ZImagefile, else its Dockerfile.
    A `wasm:` ZImagefile is compiled here (as `zlayerctl wasm build` does)
    and stored as a WebAssembly image.
    """
    if runtime and runtime_auto:
        fail("use --runtime NAME or --runtime-auto, not both")
    if not os.path.isdir(context):
        fail(f"the build context {context} is not a directory")
    for path, what in ((dockerfile, "Dockerfile"), (zimagefile, "ZImagefile")):
        if path and not os.path.isfile(path):
            fail(f"there is no {what} {path}")
    _check_tags(list(tags), push)
    chosen = "" if runtime or runtime_auto else zimagefile or ("" if dockerfile else context)
    wasm_file = _wasm_zimagefile(chosen)
    if wasm_file:
        if build_args or target:
            fail("--build-arg and --target do not apply to a `wasm:` ZImagefile; leave them out")
        _build_wasm(context, wasm_file, list(tags), push, output_format)
        return
    request = BuildRequest(
        context=os.path.abspath(context),
        dockerfile=os.path.abspath(dockerfile) if dockerfile else "",
        zimagefile=os.path.abspath(zimagefile) if zimagefile else "",
        runtime=RUNTIME_AUTO if runtime_auto else runtime,
        tags=list(tags),
        build_args=_pairs(build_args, "--build-arg"),
        target=target,
        no_cache=no_cache,
        format="docker" if image_format == "docker" else "oci",
    )
    # The log is for people: on stderr when stdout carries JSON.
    out = sys.stderr if output_format == "json" else sys.stdout

    async def run() -> tuple[BuildResult | str, list[PushResult]]:
        client = Client()
        try:
            followed = _build(client, request)
            (info,) = await follow_jobs(client, [followed], out)
            outcome = _outcome(info, ", ".join(tags) or context, followed.sent)
            pushed = (
                await _push_all(client, list(tags), out)
                if push and isinstance(outcome, BuildResult)
                else []
            )
            return outcome, pushed
        finally:
            client.close()

    outcome, pushed = asyncio.run(run())
    if isinstance(outcome, str):
        fail(outcome)
    if output_format == "json":
        print_json({**to_builtins(outcome), "pushed": to_builtins(pushed)})
        return
    names = ", ".join(outcome.names) or "no name (give one with -t)"
    click.echo(f"built {names}: {short_id(outcome.id)} in {outcome.seconds:.1f}s")


# ---------------------------------------------------------------- the wasm mode


def _wasm_zimagefile(path: str) -> str:
    """``path`` (a ZImagefile, or a context with one) if it is a `wasm:` ZImagefile, else "".

    A look at the text, not a parse: other builds load no build format here.
    """
    if path and os.path.isdir(path):
        path = os.path.join(path, "ZImagefile")
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return ""
    return path if re.search(r"^wasm\s*:", text, re.MULTILINE) else ""


def _build_wasm(
    context: str, zimagefile: str, tags: list[str], push: bool, output_format: str
) -> None:
    """Build a `wasm:` ZImagefile here, as `zlayerctl wasm build` does, and store the module
    under each tag as `--export NAME --import` does."""
    import tempfile
    import time

    from ctl.wasm_cmd import _export_built, _validated
    from shared.buildfile.located import BuildFileError
    from shared.buildfile.wasm import WasmBuildError, plan
    from shared.buildfile.wasm import build as run_build
    from shared.buildfile.zimagefile import WasmFile, load_zimagefile

    if not tags:
        fail("a `wasm:` ZImagefile's image needs a name; give one with -t")
    out = sys.stderr if output_format == "json" else sys.stdout
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zlayer-wasm-") as work:
        try:
            loaded = load_zimagefile(zimagefile)
            job = plan(context, zimagefile=zimagefile)
        except (BuildFileError, WasmBuildError) as exc:
            fail(str(exc))
        # The image is the result: the module is kept only where the ZImagefile says `output`.
        written = isinstance(loaded.model, WasmFile) and loaded.model.wasm.output
        if not written:
            job = replace_dataclass(job, output=Path(work) / f"{job.directory.name or 'app'}.wasm")
        for note in job.notes:
            out.write(f"note: {note}\n")
        out.write(f"building {job.directory} ({job.language}, WASI {job.target})\n")
        out.flush()
        try:
            built = run_build(job)
        except WasmBuildError as exc:
            fail(str(exc))
        found = _validated(str(built), None)
        out.write(f"built {built if written else 'the module'}: {found.summary()}\n")
        layout = os.path.join(work, "layout")
        _export_built(str(built), tags[0], layout)

        async def run() -> tuple[ImageInfo, list[PushResult]]:
            from ctl.image_cmd import IMPORT_CALL_USEC

            client = Client()
            client.bus.method_call_timeout_usec = IMPORT_CALL_USEC
            try:
                # Under systemd registryd has its own /tmp: Sent copies the layout when it must.
                sent = Sent(client.registry)
                with sent.speaking_our_paths():
                    theirs = await sent.path(layout)
                    for tag in tags:  # each import adds its name to the one stored image
                        image = await client.registry.import_image(theirs, tag)
                pushed = await _push_all(client, tags, out) if push else []
                return image, pushed
            finally:
                client.close()

        image, pushed = asyncio.run(run())
    result = BuildResult(
        id=image.id, names=image.names, source="ZImagefile", seconds=time.monotonic() - started
    )
    if output_format == "json":
        print_json({**to_builtins(result), "pushed": to_builtins(pushed)})
        return
    click.echo(f"built {', '.join(result.names)}: {short_id(result.id)} in {result.seconds:.1f}s")


# ---------------------------------------------------------------- runtimes


@click.command("runtimes")
@click.argument("name", required=False)
@format_option
def runtimes_(name: str | None, output_format: str) -> None:
    """List the runtime templates, or print the Dockerfile of template NAME."""
    from shared.buildfile import runtimes

    if name:
        if name not in runtimes.TEMPLATES:
            from shared.spec.errors import did_you_mean

            fail(
                f"there is no runtime template `{name}`; one of {', '.join(runtimes.names())}"
                + did_you_mean(name, runtimes.names())
            )
        text = runtimes.render(name, Path.cwd())
        if output_format == "json":
            print_json({"name": name, "dockerfile": text})
        else:
            click.echo(text, nl=False)
        return
    templates = list(runtimes.TEMPLATES.values())
    if output_format == "json":
        print_json(
            [
                {
                    "name": t.name,
                    "base": t.base,
                    "detected_by": t.detected_by,
                    "description": t.description,
                }
                for t in templates
            ]
        )
        return
    print_table(
        ["NAME", "RUNS ON", "DETECTED FROM", "DESCRIPTION"],
        [[t.name, t.base, t.detected_by, t.description] for t in templates],
    )


# ---------------------------------------------------------------- pipeline


def _pipeline_file(path: str | None) -> str:
    if path:
        return path
    for name in PIPELINE_FILES:
        if os.path.isfile(name):
            return name
    fail("there is no ZPipeline.yaml here; name one with -f")


def _request(image: PlannedImage) -> BuildRequest:
    return BuildRequest(
        context=str(image.context),
        dockerfile="" if image.is_zimagefile else str(image.file),
        zimagefile=str(image.file) if image.is_zimagefile else "",
        tags=image.tags,
        build_args=image.build_args,
        target=image.target or "",
        no_cache=image.no_cache,
        format=image.format,
    )


async def _build_waves(
    client: Client, pipeline: Pipeline, waves: list[list[str]], out: IO[str]
) -> tuple[dict[str, BuildResult], str]:
    """Build wave after wave; the first failure's sentence stops later waves."""
    results: dict[str, BuildResult] = {}
    width = max(len(name) for wave in waves for name in wave)
    for number, wave in enumerate(waves):
        out.write(f"wave {number}: {', '.join(wave)}\n")
        followed = [
            _build(client, _request(pipeline.images[name]), prefix=f"[{name:<{width}}] ")
            for name in wave
        ]
        infos = await follow_jobs(client, followed, out)
        failures = []
        for name, info, job in zip(wave, infos, followed, strict=True):
            outcome = _outcome(info, name, job.sent)
            if isinstance(outcome, str):
                failures.append(f"image `{name}`: {outcome}")
            else:
                results[name] = outcome
        if failures:
            return results, "; ".join(failures)
    return results, ""


@click.command("pipeline")
@click.option("-f", "--file", "path", default=None, help="the ZPipeline (default ZPipeline.yaml)")
@click.option("--set", "overrides", multiple=True, help="VAR=VALUE, over the file's vars")
@click.option("--only", default="", help="build only these images (a,b) and what they need")
@click.option("--push", is_flag=True, help="push every tag after all images are built")
@format_option
def pipeline(
    path: str | None, overrides: tuple[str, ...], only: str, push: bool, output_format: str
) -> None:
    """Build the images of a ZPipeline in dependency order."""
    from shared.buildfile.located import BuildFileError
    from shared.buildfile.pipeline import load_pipeline

    filename = _pipeline_file(path)
    try:
        loaded = load_pipeline(filename, _pairs(overrides, "--set"))
        selected = loaded.select([n.strip() for n in only.split(",") if n.strip()])
    except BuildFileError as exc:
        fail(str(exc))
    waves = loaded.waves(selected)
    push = push or loaded.push_after_all
    tags = [tag for name in selected for tag in loaded.images[name].tags]
    _check_tags(tags, False)
    out = sys.stderr if output_format == "json" else sys.stdout

    async def run() -> tuple[dict[str, BuildResult], str, list[PushResult]]:
        client = Client()
        try:
            results, failure = await _build_waves(client, loaded, waves, out)
            pushed = await _push_all(client, tags, out) if push and not failure else []
            return results, failure, pushed
        finally:
            client.close()

    results, failure, pushed = asyncio.run(run())
    if output_format == "json":
        print_json(
            {
                "images": [
                    {"name": name, **to_builtins(result)} for name, result in results.items()
                ],
                "pushed": to_builtins(pushed),
                "error": failure,
            }
        )
    else:
        rows = [
            [name, short_id(r.id), ", ".join(r.names) or "-", f"{r.seconds:.1f}s"]
            for name, r in results.items()
        ]
        if rows:
            print_table(["IMAGE", "ID", "NAMES", "TIME"], rows)
    if failure:
        fail(failure)
