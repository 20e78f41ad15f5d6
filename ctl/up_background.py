"""``zlayerctl up -b`` on this node, without click.

``up -b`` returns as soon as schedd has stored the deployment: one Deploy and
the ListEvents of the warnings it stored, through the blocking bus reader.
Importing click would be the largest part of such a command, so when
``ctl.readargs`` understands the command line ``ctl.main`` runs
:func:`up_background` directly; ``ctl.deploy_cmd.up`` (the click command)
runs the same functions, so both say the same lines and exit alike.

A file that cannot be read or that schedd refuses is read here with the spec
models (``ctl.spec_cmd``), to say where it is wrong, as ``validate`` does.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from ctl.output import err_console, fail

if TYPE_CHECKING:
    from pathlib import Path

    from shared.wire.scheduler import DeploymentStatus, Event


# ctl.spec_cmd.SPEC_PATTERNS (importing it loads click); a test holds the two equal
SPEC_PATTERNS = ("*.zlayer.yml", "*.zlayer.yaml")


def spec_path(file: str | None, command: str) -> Path:
    """FILE, or the one spec file in the current directory (as ``validate`` finds it)."""
    from pathlib import Path

    if file:
        return Path(file)
    here = Path.cwd()
    found = {p for pattern in SPEC_PATTERNS for p in here.glob(pattern) if p.is_file()}
    if len(found) == 1:
        return found.pop()
    from ctl.spec_cmd import find_spec_file  # its sentences for none or several

    return find_spec_file(here, command)


def read_spec(file: str | None, command: str) -> tuple[str, str, dict[str, str], str]:
    """(spec text, file name, host env values, deployment name), or exit with every issue."""
    from ctl.spec_cmd import load_or_report
    from shared.spec.refs import host_env_names
    from shared.spec.support import node_support

    path = spec_path(file, command)
    spec = load_or_report(str(path), as_json=False)
    text = path.read_text()
    # Refusals come back from schedd as its error; warnings are said here, before anything
    # runs, each starting with the file, line and column of its key.
    for warning in node_support(spec, text, str(path)).warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    host_env = {name: os.environ[name] for name in host_env_names(spec) if name in os.environ}
    return text, str(path), host_env, spec.deployment


# A ``$E:VAR`` reference as shared.spec.refs reads one (kept here: importing it loads the models).
_HOST_ENV = re.compile(r"\$E:([A-Za-z_][A-Za-z0-9_]*)")


def spec_text(file: str | None, command: str) -> tuple[str, str, dict[str, str]]:
    """(spec text, file name, host env values) without reading the spec: schedd does.

    The values sent are those of every ``$E:`` name in the text (schedd
    uses the ones the spec's env values name). A file that cannot be read is
    reported as ``validate`` reports it.
    """
    filename = path_name(file) if file else str(spec_path(file, command))
    try:
        with open(filename) as opened:  # as Path.read_text opens it
            text = opened.read()
    except (OSError, UnicodeDecodeError):
        read_spec(file, command)
        raise
    names = set(_HOST_ENV.findall(text))
    host_env = {name: os.environ[name] for name in names if name in os.environ}
    return text, filename, host_env


def path_name(file: str) -> str:
    """``str(Path(file))``, the name schedd is sent, without importing pathlib (and the
    urllib.parse it imports): a few ms of a command that takes a hundred. Separators
    collapse and ``.`` parts go; a leading ``//`` stays (POSIX leaves it to the system).
    ``tests/unit/test_ctl_up_fast.py`` holds it to pathlib."""
    relative = file.lstrip("/")
    slashes = len(file) - len(relative)
    root = "//" if slashes == 2 else "/" if slashes else ""
    parts = [part for part in relative.split("/") if part and part != "."]
    return root + "/".join(parts) or "."


def warnings_of(found: list[Event], status: DeploymentStatus) -> list[str]:
    """The warnings among ``found`` (a deployment's events) of ``status``'s revision."""
    deployed = f"revision {status.revision} of {status.name} deployed"
    marks = [i for i, e in enumerate(found) if e.kind == "deploy" and e.message == deployed]
    if not marks:
        return []
    return [e.message for e in found[marks[-1] + 1 :] if e.kind == "warning"]


def deployed_line(status: DeploymentStatus) -> None:
    err_console.print(
        f"deployed revision {status.revision} of [bold]{status.name}[/]", highlight=False
    )


def up_in_background(file: str | None, text: str, filename: str, host_env: dict[str, str]) -> None:
    """``up -b`` on this node: Deploy, then the warnings it stored, as two calls through
    the blocking bus reader (as the read commands make theirs): nothing else waits, so
    asyncio, sdbus and the bus clients would be most of the command's time."""
    from ctl.errors import NOT_RUNNING
    from shared.busread import BusReader, NoBusError, bus_address

    try:
        bus = BusReader(bus_address())
    except NoBusError:
        fail(NOT_RUNNING, 1)
    with bus:
        try:
            status = bus.deploy(text, filename, host_env).status
        except Exception:
            read_spec(file, "up")  # the file's own problems, located; exits 1
            raise
        for warning in warnings_of(bus.list_events(status.name, 200), status):
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    deployed_line(status)


def up_background(file: str | None) -> None:
    """``zlayerctl up -b [FILE]`` on this node's bus (``ctl.readargs`` has checked that
    the command goes to no node's API)."""
    text, filename, host_env = spec_text(file, "up")
    up_in_background(file, text, filename, host_env)
