"""The read commands' bodies: ``ps``, ``routes``, ``dns``, ``image ls`` and ``events``.

Each asks the daemons through :class:`shared.busread.BusReader` (blocking,
no asyncio or sdbus) and prints a table, lines or JSON. The click commands
in ``deploy_cmd``, ``traffic_cmd`` and ``image_cmd`` call these functions,
and so does ``ctl.main`` for a command line ``ctl.readargs`` understands,
without importing click; either way the output is the same. ``status``'s
body is ``ctl.status_cmd.show``.

Importing this module imports neither click nor rich (``ctl.output`` loads
rich only for a terminal).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ctl.output import (
    console,
    err_console,
    fail,
    human_size,
    print_json,
    print_rows,
    print_table,
    short_id,
)
from shared.busread import BusReader, NoBusError, bus_address
from shared.wire import to_builtins

if TYPE_CHECKING:
    from ctl.remote import RemoteReader
    from shared.wire.scheduler import Event

_STATE_COLOUR = {
    "running": "green",
    "healthy": "green",
    "succeeded": "green",
    "starting": "yellow",
    "updating": "yellow",
    "deploying": "yellow",
    "waiting": "yellow",
    "pending": "yellow",
    "initializing": "yellow",
    "creating": "yellow",
    "removing": "yellow",
    "stopping": "yellow",
    "restarting": "yellow",
    "stopped": "dim",
    "exited": "dim",
    "none": "dim",
}


def coloured(state: str) -> str:
    return f"[{_STATE_COLOUR.get(state, 'red')}]{state}[/]"


def stamp(when: float) -> str:
    return datetime.fromtimestamp(when).strftime("%H:%M:%S")


def uptime(started: float | None) -> str:
    if not started:
        return ""
    seconds = int(time.time() - started)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def reader() -> BusReader | RemoteReader:
    """A connection to the daemons' bus, or exit with the sentence for daemons not running;
    with ``--host`` (or ZLAYER_HOST, or a current context) the node's API instead."""
    from ctl.errors import NOT_RUNNING
    from ctl.readargs import is_remote

    if is_remote():
        from ctl.remote import RemoteReader

        return RemoteReader()

    try:
        return BusReader(bus_address())
    except NoBusError:
        fail(NOT_RUNNING, 1)


def ps(containers: bool, deployment: str | None, output_format: str) -> None:
    """Deployments and their services (or replicas with ``containers``)."""
    with reader() as bus:
        if containers:
            replicas = bus.list_replicas(deployment or "", "")
        else:
            statuses = bus.list_deployments()
    if containers:
        # In a cluster each replica names its node; alone, the column is left out.
        nodes = any(r.node for r in replicas)
        print_rows(
            output_format,
            replicas,
            [
                *(["NODE"] if nodes else []),
                "REPLICA",
                "DEPLOYMENT",
                "SERVICE",
                "STATE",
                "HEALTH",
                "ADDRESS",
                "PID",
                "EXIT",
                "RESTARTS",
                "UPTIME",
                "MESSAGE",
            ],
            lambda r: [
                *([r.node] if nodes else []),
                r.id,
                r.deployment,
                r.service,
                coloured(r.state),
                coloured(r.health),
                r.address,
                r.pid or "",
                ""
                if r.exit_code is None
                else (f"{r.exit_code} (OOM)" if r.oom_killed else r.exit_code),
                r.restarts,
                uptime(r.started_at) if r.state == "running" else "",
                r.message,
            ],
        )
        return
    if deployment:
        statuses = [s for s in statuses if s.name == deployment]
    if output_format == "json":
        print_json(to_builtins(statuses))
        return
    if not statuses:
        err_console.print("no deployments; start one with `zlayerctl up FILE`", highlight=False)
        return
    rows = []
    for status in statuses:
        for svc in status.services:
            running = f"{svc.running}/{svc.desired}" if svc.rtype == "service" else "-"
            healthy = f"{svc.healthy}/{svc.desired}" if svc.rtype == "service" else "-"
            rows.append(
                [
                    status.name,
                    status.revision,
                    svc.name,
                    svc.rtype,
                    svc.image,
                    running,
                    healthy,
                    coloured(svc.state),
                    svc.message,
                ]
            )
    print_table(
        ["DEPLOYMENT", "REV", "SERVICE", "TYPE", "IMAGE", "RUNNING", "HEALTHY", "STATE", "MESSAGE"],
        rows,
    )


def routes(deployment: str | None, output_format: str) -> None:
    """The routes proxyd serves."""
    with reader() as bus:
        found = [r for r in bus.list_routes() if not deployment or r.deployment == deployment]
    print_rows(
        output_format,
        found,
        ["DEPLOYMENT", "SERVICE", "ENDPOINT", "PROTOCOL", "LISTEN", "HOST", "PATH", "BACKENDS"],
        lambda r: [
            r.deployment,
            r.service,
            r.endpoint,
            r.protocol,
            r.listen,
            r.host or "*",
            r.path,
            ", ".join(r.backends) or "none (503)",
        ],
    )


def dns(deployment: str | None, output_format: str) -> None:
    """The names the service DNS answers."""
    with reader() as bus:
        found = [r for r in bus.list_records() if not deployment or r.deployment == deployment]
    print_rows(
        output_format,
        found,
        ["NAME", "ADDRESSES", "DEPLOYMENT", "SERVICE"],
        lambda r: [r.name, ", ".join(r.addresses) or "-", r.deployment, r.service],
    )


def _created(value: str) -> str:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value


def image_ls(output_format: str, quiet: bool) -> None:
    """The images on this node."""
    with reader() as bus:
        images = bus.list_images()
    if output_format == "json":
        print_json(to_builtins(images))
        return
    if quiet:
        for info in images:
            _line(short_id(info.id))
        return
    rows: list[list[Any]] = []
    for info in images:
        for name in info.names or ["<none>"]:
            rows.append(
                [
                    name,
                    short_id(info.id),
                    human_size(info.size),
                    len(info.layers),
                    _created(info.created),
                    f"{info.os}/{info.architecture}".strip("/"),
                ]
            )
    print_table(["NAME", "ID", "SIZE", "LAYERS", "CREATED", "PLATFORM"], rows)


def _line(text: str) -> None:
    """One line on stdout, as ``click.echo`` writes it."""
    import sys

    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_events(found: list[Event], deployment: str | None, output_format: str) -> None:
    """The events ``events`` lists, before any it follows."""
    if output_format == "json":
        print_json(to_builtins(found))
        return
    for event in found:
        where = "" if deployment else f"[bold]{event.deployment}[/] "
        service = f"{event.service}: " if event.service else ""
        console.print(
            f"[dim]{stamp(event.time)}[/] {where}{service}{event.message}", highlight=False
        )


def events(deployment: str | None, limit: int, output_format: str) -> None:
    """The last ``limit`` events (of one deployment, or all); ``events -f`` follows on sdbus."""
    try:
        with reader() as bus:
            found = bus.list_events(deployment or "", limit)
        print_events(found, deployment, output_format)
    except KeyboardInterrupt:
        pass  # as `events` always did: Ctrl-C ends it quietly


def remote_status(output_format: str) -> None:
    """``status`` through a node's API: its daemons as its apid finds them on its bus,
    in the rows and columns ``ctl.status_cmd`` prints."""
    from ctl.remote import RemoteReader
    from ctl.status_cmd import answered, not_answering, print_status
    from shared.busread import BUS_NAMES

    with RemoteReader() as api:
        found = {d.name: d for d in api.daemons()}
    rows = [
        answered(found[name]) if name in found else not_answering(name, "not running")
        for name in BUS_NAMES
    ]
    print_status(rows, output_format)
