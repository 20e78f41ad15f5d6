"""``zlayerctl validate`` and ``zlayerctl spec dump|schema``: deployment specs offline.

Owns the commands that read a ``*.zlayer.yml`` without talking to any daemon:
checking it (every located problem, or a one-line summary per service),
printing it normalised with defaults filled in, and printing the JSON Schema
editors can validate against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ctl.output import format_option, print_json

# validate's body and what it shares with the commands here live in ctl.spec_check, which
# imports no click (ctl.main runs `validate FILE` without it); the names stay importable here.
from ctl.spec_check import (
    EXIT_INVALID,
    EXIT_NO_FILE,
    SCHEDD_CHECKS_AT_MOST,
    SPEC_PATTERNS,
    check_by_schedd,
    check_here,
    find_spec_file,
)
from ctl.spec_check import report_invalid as _report_invalid
from ctl.spec_check import validate as check_and_print

if TYPE_CHECKING:
    from shared.spec import DeploymentSpec

__all__ = [
    "EXIT_INVALID",
    "EXIT_NO_FILE",
    "SCHEDD_CHECKS_AT_MOST",
    "SPEC_PATTERNS",
    "check_by_schedd",
    "check_here",
    "dump",
    "find_spec_file",
    "load_or_report",
    "schema",
    "spec",
    "validate",
]


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


@click.command()
@click.argument("file", required=False)
@format_option
def validate(file: str | None, output_format: str) -> None:
    """Check a deployment spec and list every problem in it.

    With no FILE, the single *.zlayer.yml (or *.zlayer.yaml) in the current
    directory is used. Exit status: 0 valid, 1 invalid, 2 no file to check.
    """
    check_and_print(file, output_format)


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
