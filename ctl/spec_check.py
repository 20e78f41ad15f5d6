"""``zlayerctl validate``'s body, without click.

``validate FILE`` runs often (editors, CI, before each ``up``) and is mostly
start-up: with root and schedd running, schedd checks the file
(``Scheduler1.Validate``, through the blocking bus reader) and this process
only prints its answer, so importing click would be the largest part of it.
``ctl.readargs`` reads ``validate FILE [--format F]`` and ``ctl.main`` runs
:func:`validate` directly; the click command (``ctl.spec_cmd.validate``)
runs the same function, so both print the same lines and exit alike.

Importing this module imports neither click nor rich, nor the spec models
(only :func:`check_here`, the check made in this process, loads them).
"""

from __future__ import annotations

import os
import stat
import sys
from typing import TYPE_CHECKING, NoReturn

from ctl.output import escape, fail, print_json, print_table

if TYPE_CHECKING:
    from pathlib import Path

    from shared.wire.scheduler import ServiceSummary, SpecCheck

SPEC_PATTERNS = ("*.zlayer.yml", "*.zlayer.yaml")

# Not finding which file to read is a usage problem, not an invalid spec.
EXIT_INVALID = 1
EXIT_NO_FILE = 2

# schedd checks files up to shared.spec.limits.MAX_SPEC_BYTES (importing it loads the spec
# models; a test holds the two equal); a larger one is checked here, which says why.
SCHEDD_CHECKS_AT_MOST = 1024 * 1024


def echo(text: str, err: bool = False) -> None:
    """One line, as ``click.echo`` writes it (click only for what it would change)."""
    if "\x1b" in text:  # click strips ANSI codes from output that is not a terminal
        import click

        click.echo(text, err=err)
        return
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    fail(escape(message), code)
    raise SystemExit(code)  # fail() always exits; this tells the type checker


def find_spec_file(directory: Path, command: str = "validate") -> Path:
    """The one ``*.zlayer.yml``/``*.zlayer.yaml`` in ``directory``; exits when none or several."""
    found = sorted({p for pattern in SPEC_PATTERNS for p in directory.glob(pattern) if p.is_file()})
    if not found:
        _fail(
            "no *.zlayer.yml or *.zlayer.yaml file in the current directory; "
            f"name the spec file: zlayerctl {command} FILE",
            EXIT_NO_FILE,
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        _fail(
            f"several spec files in the current directory ({names}); "
            f"name the one to use: zlayerctl {command} FILE",
            EXIT_NO_FILE,
        )
    return found[0]


def report_invalid(check: SpecCheck, file: str, as_json: bool) -> NoReturn:
    """Every problem printed (or the JSON of them), then exit 1."""
    from shared.wire import to_builtins

    if as_json:
        issues = [to_builtins(p) for p in check.problems]
        print_json({"file": file, "valid": False, "issues": issues})
        raise SystemExit(EXIT_INVALID)
    if len(check.problems) == 1 and not check.problems[0].line:
        _fail(str(check.problems[0]))  # about the whole file (missing, empty): one sentence
    for problem in check.problems:
        echo(str(problem), err=True)
    total = check.total
    _fail(f"{file} is not a valid deployment spec ({total} problem{'s' * (total != 1)})")


def check_here(file: str) -> SpecCheck:
    """The check of ``file`` made in this process (loads the spec models)."""
    from shared.spec.check import check_spec, problems_of
    from shared.spec.errors import SpecError, SpecIssue
    from shared.spec.limits import FileReadError, read_regular_file

    try:
        raw = read_regular_file(file)
    except FileReadError as exc:
        return problems_of(SpecError([SpecIssue(file, 0, 0, "", str(exc))]))
    return check_spec(raw, file)


def check_by_schedd(file: str) -> SpecCheck | None:
    """schedd's check of ``file``, or None when it is this process's to make.

    schedd has the spec models loaded; loading them here costs more than the
    round trip. Anything out of the ordinary (not root, whom ``Validate`` is
    for; no bus or no schedd; a file that is not a small regular UTF-8 text)
    is left to :func:`check_here`, which says what the local check says.
    """
    if os.geteuid() != 0:
        return None
    try:
        # O_NONBLOCK: a FIFO must not hang here (check_here says what it is)
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > SCHEDD_CHECKS_AT_MOST:
            return None
        raw = os.read(fd, SCHEDD_CHECKS_AT_MOST + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(raw) > SCHEDD_CHECKS_AT_MOST or "\x00" in text:  # D-Bus strings hold no NUL
        return None
    from shared.busread import BusError, BusReader, NoBusError, bus_address

    try:
        with BusReader(bus_address()) as bus:
            return bus.validate(text, file, {})
    except (BusError, NoBusError, ValueError):  # ValueError: a reply of another shape
        return None


def _endpoints(service: ServiceSummary) -> str:
    return (
        ", ".join(
            f"{e.name}:{e.port}/{e.protocol}" + (" public" if e.public else "")
            for e in service.endpoints
        )
        or "-"
    )


def _rtype(service: ServiceSummary) -> str:
    if service.rtype == "cron" and service.schedule:
        return f"cron ({service.schedule})"
    return service.rtype


def validate(file: str | None, output_format: str) -> None:
    """``zlayerctl validate [FILE] [--format F]``: check FILE (or the one spec file here)
    and print every problem, or a summary of its services; exit 1 when invalid."""
    if file is None:
        from pathlib import Path

        path = str(find_spec_file(Path.cwd()).name)
    else:
        path = file
    as_json = output_format == "json"
    check = check_by_schedd(path) or check_here(path)
    if not check.valid:
        report_invalid(check, path, as_json)
    # The file is valid either way; what this node would refuse or ignore is said, not failed.
    if not as_json:
        for text in check.refusals:
            echo(f"warning: {text} (up refuses it on this node)", err=True)
        for text in check.warnings:
            echo(f"warning: {text}", err=True)
    services = check.services
    if as_json:
        print_json(
            {
                "file": path,
                "valid": True,
                "refused_here": check.refusals,
                "warnings": check.warnings,
                "deployment": check.deployment,
                "services": [
                    {
                        "name": s.name,
                        "rtype": s.rtype,
                        "image": s.image,
                        "endpoints": [
                            {"name": e.name, "protocol": e.protocol, "port": e.port}
                            for e in s.endpoints
                        ],
                        "scale": s.scale,
                    }
                    for s in services
                ],
            }
        )
        return
    noun = "service" if len(services) == 1 else "services"
    echo(f"{path}: valid, deployment {check.deployment}, {len(services)} {noun}")
    if services:
        print_table(
            ["SERVICE", "RTYPE", "IMAGE", "ENDPOINTS", "SCALE"],
            [[s.name, _rtype(s), s.image, _endpoints(s), s.scale] for s in services],
        )
