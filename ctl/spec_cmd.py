"""``zlayerctl validate`` and ``zlayerctl spec dump|schema``: deployment specs offline.

Owns the commands that read a ``*.zlayer.yml`` without talking to any daemon:
checking it (every located problem, or a one-line summary per service),
printing it normalised with defaults filled in, and printing the JSON Schema
editors can validate against.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from ctl.output import escape, fail, format_option, print_json, print_table
from shared.spec import (
    DeploymentSpec,
    SpecError,
    SpecIssue,
    dump_spec,
    parse_spec,
    spec_json_schema,
)
from shared.spec.limits import FileReadError, read_regular_file
from shared.spec.models import AdaptiveScale, FixedScale, ServiceSpec
from shared.spec.support import node_support

SPEC_PATTERNS = ("*.zlayer.yml", "*.zlayer.yaml")

# Not finding which file to read is a usage problem, not an invalid spec.
EXIT_INVALID = 1
EXIT_NO_FILE = 2


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
    try:
        try:
            raw = read_regular_file(file)
        except FileReadError as exc:
            raise SpecError([SpecIssue(file, 0, 0, "", str(exc))]) from None
        return parse_spec(raw, file), raw
    except SpecError as exc:
        if as_json:
            print_json({"file": file, "valid": False, "issues": [i.as_dict() for i in exc.issues]})
            raise SystemExit(EXIT_INVALID) from None
        if len(exc.issues) == 1 and not exc.issues[0].line:
            _fail(str(exc.issues[0]))  # about the whole file (missing, empty): one sentence
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        count = exc.total
        _fail(f"{file} is not a valid deployment spec ({count} problem{'s' * (count != 1)})")


def _endpoints(service: ServiceSpec) -> str:
    return (
        ", ".join(
            f"{e.name}:{e.port}/{e.protocol}" + (" public" if e.expose == "public" else "")
            for e in service.endpoints
        )
        or "-"
    )


def _scale(service: ServiceSpec) -> str:
    if service.rtype != "service" and "scale" not in service.model_fields_set:
        return "-"  # jobs and cron runs are started per trigger, not kept at a count
    scale = service.scale
    if isinstance(scale, FixedScale):
        return f"fixed {scale.replicas}"
    if isinstance(scale, AdaptiveScale):
        return f"adaptive {scale.min}-{scale.max}"
    return "manual"


def _rtype(service: ServiceSpec) -> str:
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
    spec, raw = _read_and_load(path, as_json)
    # The file is valid either way; what this node would refuse or ignore is said, not failed.
    support = node_support(spec, raw, path)
    if not as_json:
        for text in support.refusals:
            click.echo(f"warning: {text} (up refuses it on this node)", err=True)
        for text in support.warnings:
            click.echo(f"warning: {text}", err=True)
    services = spec.services
    if as_json:
        print_json(
            {
                "file": path,
                "valid": True,
                "refused_here": support.refusals,
                "warnings": support.warnings,
                "deployment": spec.deployment,
                "services": [
                    {
                        "name": name,
                        "rtype": s.rtype,
                        "image": s.image.name,
                        "endpoints": [
                            {"name": e.name, "protocol": e.protocol, "port": e.port}
                            for e in s.endpoints
                        ],
                        "scale": _scale(s),
                    }
                    for name, s in services.items()
                ],
            }
        )
        return
    noun = "service" if len(services) == 1 else "services"
    click.echo(f"{path}: valid, deployment {spec.deployment}, {len(services)} {noun}")
    if services:
        print_table(
            ["SERVICE", "RTYPE", "IMAGE", "ENDPOINTS", "SCALE"],
            [
                [name, _rtype(s), s.image.name, _endpoints(s), _scale(s)]
                for name, s in services.items()
            ],
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
    loaded = load_or_report(file, as_json=False)
    click.echo(dump_spec(loaded, "json" if output_format == "json" else "yaml"), nl=False)


@spec.command("schema")
def schema() -> None:
    """Print the JSON Schema of deployment specs (for editors and CI)."""
    print_json(spec_json_schema())
