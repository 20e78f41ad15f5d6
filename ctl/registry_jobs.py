"""What ``zlayerctl pull``, ``image push`` and ``export`` do, without click.

Each is a registryd job: the command starts one and waits for its
JobRemoved signal, drawing a progress bar per layer (rich) from the job's
Progress meanwhile, on a terminal only. On this node's bus they go through
the blocking connection of ``shared.busread`` (no asyncio or sdbus, whose
import was most of a warm pull's time); through a node's API (``--host``)
the typed clients of ``ctl.client`` wait instead, with the same output.
The click commands are in ``ctl.registry_cmd``; :func:`pull` is the whole
of ``zlayerctl pull`` after its arguments, so a command line parsed without
click can run it too.

zlayerctl runs as the user, so it is what can read the user's Docker and
Podman auth files; it passes registryd only the entry for the registry at
hand (see shared/credentials.py).

msgspec and the wire types are imported once a job has started, not at import
(:func:`ctl.readargs.import_msgspec_lean`): their ~20 ms then pass while
registryd works, a cold pull's job among it, instead of before it starts.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

from ctl.output import err_console, fail, print_json
from ctl.readargs import POLICIES as POLICIES
from ctl.readargs import import_msgspec_lean

if TYPE_CHECKING:
    from ctl.client import Client
    from shared.busread import BusReader
    from shared.wire.jobs import JobInfo

# as shared.clients.FALLBACK_SECONDS: GetJob after this long without a signal
FALLBACK_SECONDS = 2.0
NOT_FOUND = "org.zlayer.Error.NotFound"  # shared.bus.NotFoundError's name
PROPERTIES = "org.freedesktop.DBus.Properties"


def auth_for(reference: str) -> str:
    from shared.credentials import user_credential
    from shared.reference import InvalidReferenceError, parse_reference

    try:
        registry = parse_reference(reference.strip()).domain
    except InvalidReferenceError as exc:
        fail(str(exc))
    return user_credential(registry)


def bars(
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


def restarted(what: str) -> NoReturn:
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

    display, draw = bars(show)
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
            restarted(what)
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

    display, draw = bars(show)
    job_id: int | None = None
    with display:
        try:
            # before the job starts: an end that comes at once (a warm pull) is not missed;
            # the bus takes the match before the start, which it handles next
            signals = bus.subscribe(JOB_REMOVED, confirm=False)
            job_id = start(bus)
            import_msgspec_lean()
            from shared.wire import decode
            from shared.wire.jobs import JobInfo, ProgressItem

            # Without bars only the end matters, and JobRemoved (subscribed to before the
            # start) brings it: no GetJob round trip while a warm pull's job runs.
            info: JobInfo | None = None
            if draw is not None:
                info = bus.get_job(job_id)
            if draw is not None and info is not None and info.state == "running":
                path = f"{object_path(BUS_NAMES[JOB_REMOVED.daemon])}/job/{job_id}"
                changed = Read(JOB_REMOVED.daemon, "PropertiesChanged", "sa{sv}as", "")
                bus.subscribe(changed, path=path, interface=PROPERTIES, queue=signals)
                draw(bus.get_job(job_id))  # what happened before the match
            while info is None or info.state == "running":
                try:
                    member, body = bus.wait(signals, FALLBACK_SECONDS)
                except TimeoutError:
                    info = bus.get_job(job_id)
                    continue
                if member == JOB_REMOVED.member:
                    if body[0] == job_id:
                        info = decode(body[2], JobInfo)
                elif draw is not None and info is not None and "Progress" in body[1]:
                    info.items = decode(body[1]["Progress"][1], list[ProgressItem])
                    draw(info)
            if draw is not None:
                draw(info)
            return info
        except BusError as exc:
            if job_id is None or exc.name != NOT_FOUND:
                raise  # the start's own refusal (no such image), or the bus's
            restarted(what)
        except KeyboardInterrupt:
            if job_id is not None:
                with contextlib.suppress(Exception):
                    bus.cancel_job(job_id)
            raise


def finish(info: JobInfo) -> str:
    if info.state == "done":
        return info.result
    if info.state == "cancelled":
        fail(f"the {info.kind} of {info.target} was cancelled")
    fail(info.error or f"the {info.kind} of {info.target} failed")


def on_bus() -> bool:
    """Whether the command goes to this node's bus, not to a node's API."""
    from ctl.readargs import is_remote

    return not is_remote()


async def run_job(start: Callable[[Client], Awaitable[int]], what: str, show: bool) -> str:
    from ctl.client import Client

    client = Client()
    try:
        info = await wait_job(client, partial(start, client), what, show)
    finally:
        client.close()
    return finish(info)


def run_bus_job(start: Callable[[BusReader], int], what: str, show: bool, fds: bool = False) -> str:
    from shared.busread import BusReader, bus_address

    with BusReader(bus_address(), enable_fds=fds) as bus:
        info = wait_bus_job(bus, start, what, show)
    return finish(info)


def pull(image_name: str, policy: str = "always", output_format: str = "table") -> None:
    """``zlayerctl pull IMAGE [--policy P] [--format F]``: the image's line, or its JSON."""
    auth = auth_for(image_name)
    show = output_format != "json"
    if on_bus():
        result = run_bus_job(lambda bus: bus.pull(image_name, policy, auth), "pull", show)
    else:
        import asyncio

        async def start(client: Client) -> int:
            return await client.registry.pull(image_name, policy, auth)

        result = asyncio.run(run_job(start, "pull", show))
    import_msgspec_lean()
    from shared.wire import decode, to_builtins
    from shared.wire.registry import ImageInfo

    info = decode(result, ImageInfo)
    if output_format == "json":
        print_json(to_builtins(info))
        return
    name = info.names[0] if info.names else image_name
    _line(f"pulled {name}: {info.id}")


def push(image_name: str, destination: str = "", output_format: str = "table") -> None:
    """``zlayerctl image push NAME [DEST] [--format F]``."""
    auth = auth_for(destination or image_name) if (destination or "/" in image_name) else ""
    show = output_format != "json"
    if on_bus():
        text = run_bus_job(lambda bus: bus.push(image_name, destination, auth), "push", show)
    else:
        import asyncio

        async def start(client: Client) -> int:
            return await client.registry.push(image_name, destination, auth)

        text = asyncio.run(run_job(start, "push", show))
    import_msgspec_lean()
    from shared.wire import decode, to_builtins
    from shared.wire.registry import PushResult

    result = decode(text, PushResult)
    if output_format == "json":
        print_json(to_builtins(result))
        return
    _line(f"pushed {result.reference}: {result.digest}")


def _line(text: str) -> None:
    """One line on stdout, as ``click.echo`` writes it."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
