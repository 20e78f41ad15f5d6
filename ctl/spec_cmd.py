"""``zlayerctl validate`` and ``zlayerctl spec dump|schema``: deployment specs offline.

Owns the commands that read a ``*.zlayer.yml`` without talking to any daemon:
checking it (every located problem, or a one-line summary per service),
printing it normalised with defaults filled in, and printing the JSON Schema
editors can validate against.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from ctl.output import escape, fail, format_option, print_json, print_table

if TYPE_CHECKING:
    from shared.spec import DeploymentSpec
    from shared.wire.scheduler import ServiceSummary, SpecCheck

SPEC_PATTERNS = ("*.zlayer.yml", "*.zlayer.yaml")

# Not finding which file to read is a usage problem, not an invalid spec.
EXIT_INVALID = 1
EXIT_NO_FILE = 2

# schedd checks files up to shared.spec.limits.MAX_SPEC_BYTES (importing it loads the spec
# models; a test holds the two equal); a larger one is checked here, which says why.
SCHEDD_CHECKS_AT_MOST = 1024 * 1024


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


def load_or_report(file: str, as_json: bool) -> DeploymentSpec:
    """The validated spec, or every issue printed and exit 1."""
    return _read_and_load(file, as_json)[0]


def _read_and_load(file: str, as_json: bool) -> tuple[DeploymentSpec, bytes]:
    """The validated spec and the file's bytes (to locate what a node would not do)."""
    from shared.spec import SpecError, SpecIssue, parse_spec
    from shared.spec.limits import FileReadError, read_regular_file

    try:
        try:
            raw = read_regular_file(file)
        except FileReadError as exc:
            raise SpecError([SpecIssue(file, 0, 0, "", str(exc))]) from None
        return parse_spec(raw, file), raw
    except SpecError as exc:
        from shared.spec.check import problems_of

        _report_invalid(problems_of(exc), file, as_json)


def _report_invalid(check: SpecCheck, file: str, as_json: bool) -> NoReturn:
    """Every problem printed (or the JSON of them), then exit 1."""
    from shared.wire import to_builtins

    if as_json:
        issues = [to_builtins(p) for p in check.problems]
        print_json({"file": file, "valid": False, "issues": issues})
        raise SystemExit(EXIT_INVALID)
    if len(check.problems) == 1 and not check.problems[0].line:
        _fail(str(check.problems[0]))  # about the whole file (missing, empty): one sentence
    for problem in check.problems:
        click.echo(str(problem), err=True)
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


@click.command()
@click.argument("file", required=False)
@format_option
def validate(file: str | None, output_format: str) -> None:
    """Check a deployment spec and list every problem in it.

    With no FILE, the single *.zlayer.yml (or *.zlayer.yaml) in the current
    directory is used. Exit status: 0 valid, 1 invalid, 2 no file to check.
    """
    path = file if file is not None else str(find_spec_file(Path.cwd()).name)
    as_json = output_format == "json"
    check = check_by_schedd(path) or check_here(path)
    if not check.valid:
        _report_invalid(check, path, as_json)
    # The file is valid either way; what this node would refuse or ignore is said, not failed.
    if not as_json:
        for text in check.refusals:
            click.echo(f"warning: {text} (up refuses it on this node)", err=True)
        for text in check.warnings:
            click.echo(f"warning: {text}", err=True)
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
    click.echo(f"{path}: valid, deployment {check.deployment}, {len(services)} {noun}")
    if services:
        print_table(
            ["SERVICE", "RTYPE", "IMAGE", "ENDPOINTS", "SCALE"],
            [[s.name, _rtype(s), s.image, _endpoints(s), s.scale] for s in services],
        )


@click.group()
def spec() -> None:
    """Show a deployment spec normalised, or its JSON Schema."""


@spec.command("dump")
@click.argument("file")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
    help="yaml to read, json for scripts",
)
def dump(file: str, output_format: str) -> None:
    """Print FILE normalised, with every default filled in."""
    from shared.spec import dump_spec

    loaded = load_or_report(file, as_json=False)
    click.echo(dump_spec(loaded, "json" if output_format == "json" else "yaml"), nl=False)


@spec.command("schema")
def schema() -> None:
    """Print the JSON Schema of deployment specs (for editors and CI)."""
    from shared.spec import spec_json_schema

    print_json(spec_json_schema())
