"""Running a build: a request made into a Dockerfile, buildah run on it, the image stored.

registryd's builds use a buildah storage of their own under the daemon's
state directory (``build/storage``, with ``build/tmp`` for buildah's cache
mounts), never the machine's default one: base images pulled and layers
built there are the build cache, and an image built there can be the base of
the next build (a pipeline's image B ``FROM`` its image A). The finished image
is exported as an OCI layout and imported into the image store under each
tag, so ``zlayerctl up`` can use it at once; a failed build stores nothing.

Each build is a job (shared/jobs.py) whose log file receives buildah's
output as it runs. Steps run with the host's network (like ``docker build``;
buildah's own bridge would need its 10.88/16 network) under chroot
isolation, which needs no cgroup setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from daemons.registryd.received import ReceivedFiles
from shared.buildfile import runtimes
from shared.buildfile.located import BuildFileError
from shared.buildfile.zimagefile import Dockerfile, load_zimagefile, to_dockerfile
from shared.bus import (
    ERROR_PREFIX,
    InvalidArgumentError,
    InvalidSpecError,
    NotFoundError,
    UnavailableError,
    ZLayerError,
)
from shared.jobs import Job, JobTable
from shared.reference import InvalidReferenceError, parse_reference
from shared.wire import WireError, decode, encode
from shared.wire.registry import RUNTIME_AUTO, BuildRequest, BuildResult, ImageInfo

BUILDAH = "buildah"
STOP_GRACE = 10.0  # seconds buildah gets to stop on cancel before KILL
KEEP_LOGS = 50  # build logs kept; older ones are deleted when a build starts
ERROR_TAIL = 64 * 1024  # bytes of the log read back to explain a failure

StoreImport = Callable[[str, str], Awaitable[list[ImageInfo]]]
_FROM_AS = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*\S+\s+AS\s+(\S+)\s*$", re.IGNORECASE)
_STEP_ERROR = re.compile(r'building at STEP "(?P<step>.*?)": (?P<reason>.*)$')


class BuildFailedError(ZLayerError):
    """A build that ran and failed; the message names the step and why."""

    dbus_error_name = ERROR_PREFIX + "BuildFailed"


@dataclass
class PreparedBuild:
    """A request checked and made concrete: the Dockerfile buildah runs and the names to give."""

    request: BuildRequest
    context: Path
    dockerfile_path: Path
    source: str  # what is built, for people: "Dockerfile", "ZImagefile", "runtime template go"
    tags: list[str]
    origins: Dockerfile
    work_dir: Path
    label: str = field(default="")  # the file as shown in messages


class Builder:
    """Starts build jobs and runs buildah for them."""

    def __init__(
        self,
        state_dir: Path,
        jobs: JobTable,
        store_import: StoreImport,
        received: ReceivedFiles,
        log: logging.Logger,
    ) -> None:
        self.root = state_dir / "build"
        self.jobs = jobs
        self.store_import = store_import
        self.received = received  # contexts and files clients sent: kept while their build runs
        self.log = log
        self._sequence = itertools.count(1)
        self._running = 0
        self._recovered = False

    # ------------------------------------------------------------ paths and buildah

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def buildah(self, *args: str) -> list[str]:
        return [
            BUILDAH,
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def _environment(self) -> dict[str, str]:
        # buildah keeps cache mounts under TMPDIR: inside the build root, not /var/tmp.
        return {**os.environ, "TMPDIR": str(self.root / "tmp"), "BUILDAH_ISOLATION": "chroot"}

    async def _run_quietly(self, *args: str) -> int:
        process = await asyncio.create_subprocess_exec(
            *self.buildah(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=self._environment(),
        )
        return await process.wait()

    async def _recover(self) -> None:
        """Remove what a build killed with the daemon left: work dirs and buildah containers."""
        if self._recovered:
            return
        self._recovered = True
        await asyncio.to_thread(shutil.rmtree, self.root / "work", True)
        await asyncio.to_thread(lambda: (self.root / "tmp").mkdir(parents=True, exist_ok=True))
        if (self.root / "storage").is_dir():
            await self._run_quietly("rm", "--all")

    # ------------------------------------------------------------ starting a build

    async def start(self, request_json: str) -> int:
        """Check the request, then start its job; a bad request fails here, as one sentence.

        Paths a client sent (:mod:`..received`) are kept until the job ends,
        or removed at once when the request is refused.
        """
        try:
            request = decode(request_json, BuildRequest)
        except WireError as exc:
            raise InvalidArgumentError(f"the build request is malformed: {exc}") from None
        sent = (request.context, request.dockerfile, request.zimagefile)
        self.received.claim(*sent)
        try:
            if shutil.which(BUILDAH) is None:
                raise UnavailableError(
                    "buildah is not installed on this node; install it with "
                    "`apt-get install buildah`"
                )
            await self._recover()
            number = next(self._sequence)
            prepared = await asyncio.to_thread(self._prepare, request, number)
            log_path = await asyncio.to_thread(self._new_log, number, prepared)
        except BaseException:
            await asyncio.to_thread(self.received.release, *sent)
            raise
        target = ", ".join(prepared.tags) or str(prepared.context)

        async def work(job: Job) -> str:
            try:
                return await self._build(job, prepared, log_path)
            finally:
                await asyncio.to_thread(self.received.release, *sent)

        return self.jobs.start("build", target, work, str(log_path))

    def _new_log(self, number: int, prepared: PreparedBuild) -> Path:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        logs = sorted(self.logs_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[: max(0, len(logs) - KEEP_LOGS + 1)]:
            old.unlink(missing_ok=True)
        path = self.logs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{number}.log"
        names = ", ".join(prepared.tags) or "an unnamed image"
        path.write_text(f"building {names} from {prepared.source} in {prepared.context}\n")
        return path

    def _prepare(self, request: BuildRequest, number: int) -> PreparedBuild:
        context = Path(request.context)
        if not context.is_absolute():
            raise InvalidArgumentError(f"the build context {context} must be an absolute path")
        if not context.is_dir():
            what = "is not a directory" if context.exists() else "does not exist"
            raise NotFoundError(f"the build context {context} {what}")
        chosen = [
            flag
            for flag, value in (
                ("-f", request.dockerfile),
                ("-z", request.zimagefile),
                ("--runtime", request.runtime),
            )
            if value
        ]
        if len(chosen) > 1:
            raise InvalidArgumentError(f"use one of {' and '.join(chosen)}, not both")
        tags = []
        for tag in request.tags:
            try:
                tags.append(str(parse_reference(tag)))
            except InvalidReferenceError as exc:
                raise InvalidArgumentError(str(exc)) from None
        work_dir = self.root / "work" / f"{os.getpid()}-{number}"

        if request.runtime:
            name = request.runtime
            if name == RUNTIME_AUTO:
                found = runtimes.detect(context)
                if found is None:
                    raise InvalidArgumentError(
                        f"no runtime template fits {context}: it has none of package.json, "
                        "pyproject.toml, requirements.txt, Cargo.toml, go.mod, deno.json, "
                        "bun.lockb; name one with --runtime"
                    )
                name = found[0]
            elif name not in runtimes.TEMPLATES:
                from shared.spec.errors import did_you_mean

                names = runtimes.names()
                raise InvalidArgumentError(
                    f"there is no runtime template `{name}`; one of {', '.join(names)}"
                    + did_you_mean(name, names)
                )
            text = runtimes.render(name, context)
            origins = _dockerfile_origins(text, f"runtime template {name}")
            return self._write(
                request, context, text, f"runtime template {name}", tags, origins, work_dir
            )

        zimagefile = Path(request.zimagefile) if request.zimagefile else None
        dockerfile = Path(request.dockerfile) if request.dockerfile else None
        if zimagefile is None and dockerfile is None:
            if (context / "ZImagefile").is_file():
                zimagefile = context / "ZImagefile"
            elif (context / "Dockerfile").is_file():
                dockerfile = context / "Dockerfile"
            elif (context / "Containerfile").is_file():
                dockerfile = context / "Containerfile"
            else:
                raise NotFoundError(
                    f"{context} has no ZImagefile or Dockerfile; name one with -f or -z, "
                    "or use --runtime or --runtime-auto"
                )
        if zimagefile is not None:
            try:
                loaded = load_zimagefile(zimagefile)
                translated = to_dockerfile(loaded, context)
            except BuildFileError as exc:
                raise InvalidSpecError(str(exc)) from None
            if request.target and request.target not in translated.stages:
                raise InvalidArgumentError(_no_stage(request.target, zimagefile, translated.stages))
            return self._write(
                request,
                context,
                translated.text,
                "ZImagefile",
                tags,
                translated,
                work_dir,
                label=str(zimagefile),
            )

        assert dockerfile is not None
        try:
            text = dockerfile.read_text()
        except FileNotFoundError:
            raise NotFoundError(f"there is no Dockerfile {dockerfile}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"cannot read the Dockerfile {dockerfile}: {exc}") from None
        origins = _dockerfile_origins(text, str(dockerfile))
        if request.target and request.target not in origins.stages:
            raise InvalidArgumentError(_no_stage(request.target, dockerfile, origins.stages))
        return PreparedBuild(
            request, context, dockerfile, "Dockerfile", tags, origins, work_dir, str(dockerfile)
        )

    def _write(
        self,
        request: BuildRequest,
        context: Path,
        text: str,
        source: str,
        tags: list[str],
        origins: Dockerfile,
        work_dir: Path,
        label: str = "",
    ) -> PreparedBuild:
        work_dir.mkdir(parents=True, exist_ok=True)
        path = work_dir / "Dockerfile"
        path.write_text(text)
        return PreparedBuild(request, context, path, source, tags, origins, work_dir, label)

    # ------------------------------------------------------------ running it

    async def _build(self, job: Job, prepared: PreparedBuild, log_path: Path) -> str:
        started = time.monotonic()
        request = prepared.request
        prepared.work_dir.mkdir(parents=True, exist_ok=True)
        iidfile = prepared.work_dir / "image-id"
        layout = prepared.work_dir / "layout"
        args = [
            "build",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--layers",
            "--format",
            request.format,
            "--iidfile",
            str(iidfile),
            "-f",
            str(prepared.dockerfile_path),
        ]
        if request.target:
            args += ["--target", request.target]
        if request.no_cache:
            args.append("--no-cache")
        for key, value in request.build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        for tag in prepared.tags:
            args += ["-t", tag]
        args.append(str(prepared.context))
        self._running += 1
        failed = True
        try:
            job.progress("build", state="building")
            code = await self._logged(log_path, self.buildah(*args))
            if code != 0:
                raise BuildFailedError(await asyncio.to_thread(self._explain, prepared, log_path))
            image_id = (await asyncio.to_thread(iidfile.read_text)).strip()
            job.progress("build", state="done")
            job.progress("store", state="exporting")
            code = await self._logged(
                log_path, self.buildah("push", "--quiet", image_id, f"oci:{layout}")
            )
            if code != 0:
                raise BuildFailedError(
                    f"the built image could not be exported from buildah (see {log_path})"
                )
            job.progress("store", state="importing")
            stored: ImageInfo | None = None
            for tag in prepared.tags or [""]:
                (stored,) = await self.store_import(str(layout), tag)
            assert stored is not None
            job.progress("store", state="done")
            failed = False
            seconds = round(time.monotonic() - started, 3)
            await asyncio.to_thread(
                _append, log_path, f"stored {stored.id} as {', '.join(stored.names) or '-'}\n"
            )
            self.log.info("built %s as %s in %.1fs", stored.id, prepared.tags, seconds)
            return encode(
                BuildResult(
                    id=stored.id, names=stored.names, source=prepared.source, seconds=seconds
                )
            )
        finally:
            self._running -= 1
            await _to_the_end(asyncio.to_thread(shutil.rmtree, prepared.work_dir, True))
            if failed and self._running == 0:
                # A killed or failed buildah may leave working containers (and their
                # mounts); with no other build running, none of them is in use.
                await _to_the_end(self._run_quietly("rm", "--all"))

    async def _logged(self, log_path: Path, command: list[str]) -> int:
        """Run ``command`` with its output appended to the log; stop it if cancelled."""
        with open(log_path, "ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,
            )
        try:
            return await process.wait()
        except asyncio.CancelledError:
            await _to_the_end(_stop(process))
            with contextlib.suppress(OSError):
                _append(log_path, "the build was cancelled\n")
            raise

    def _explain(self, prepared: PreparedBuild, log_path: Path) -> str:
        """One sentence from buildah's last error line: which step failed, and why."""
        with open(log_path, "rb") as handle:
            handle.seek(max(0, log_path.stat().st_size - ERROR_TAIL))
            tail = handle.read().decode(errors="replace")
        errors = [
            line[len("Error: ") :] for line in tail.splitlines() if line.startswith("Error: ")
        ]
        last = errors[-1] if errors else ""
        match = _STEP_ERROR.search(last)
        if match is None:
            reason = last or "buildah stopped without saying why"
            return f"the build of {prepared.source} failed: {reason} (log: {log_path})"
        step, reason = match.group("step"), match.group("reason")
        origin = prepared.origins.origin_of(step)
        where = f" ({origin})" if origin else ""
        status = re.search(r"exit status (\d+)", reason)
        missing = re.search(r'stat: "/?(?P<file>[^"]*)": no such file or directory', reason)
        if status and step.upper().startswith("RUN"):
            why = f"failed with exit status {status.group(1)}"
        elif missing:
            why = f"failed: {missing.group('file')} is not in the build context {prepared.context}"
        else:
            why = f"failed: {reason}"
        return f"the step `{step}`{where} {why} (log: {log_path})"


async def _to_the_end(work: Awaitable[object]) -> None:
    """Finish clean-up even if the job is cancelled again meanwhile; then pass that on."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to buildah's process group, KILL after a grace period."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def _append(path: Path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


def _no_stage(target: str, file: Path, stages: list[str]) -> str:
    from shared.spec.errors import did_you_mean

    named = [s for s in stages if s]
    if not named:
        return f"--target {target}: {file} has no named stages"
    return (
        f"--target {target}: {file} has no stage `{target}` (stages: {', '.join(named)})"
        + did_you_mean(target, named)
    )


def _dockerfile_origins(text: str, label: str) -> Dockerfile:
    """Instructions of a Dockerfile with their line numbers, and its stage names."""
    origins: list[tuple[str, str]] = []
    stages: list[str] = []
    pending = ""
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        instruction = pending + stripped
        pending = ""
        origins.append((instruction, f"{label}:{start}"))
        if instruction.upper().startswith("FROM"):
            match = _FROM_AS.match(instruction)
            stages.append(match.group(1) if match else "")
    return Dockerfile(text, origins, stages)
