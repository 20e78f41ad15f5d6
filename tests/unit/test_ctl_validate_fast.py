"""``zlayerctl validate FILE`` runs without click (``ctl.readargs`` reads its command line,
``ctl.spec_check`` runs it) and says what the click command says, with the same exit codes;
anything else (no FILE, --help, two files, a format click would refuse) goes to click.

With schedd answering: ``tests/integration/test_validate_fast.py``.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from ctl import readargs
from ctl.main import cli
from tests.ctl_runs import main_without_daemons, no_daemons, same_as_click
from tests.fresh_interpreter import modules_after

VALID = """\
version: v1
deployment: web
services:
  web:
    image: zlayer/busybox:latest
    endpoints:
      - {name: http, protocol: http, port: 80}
"""

INVALID = """\
version: v1
deployment: Bad Name
services:
  web:
    image: {name: ""}
    scale: {mode: fixed, replicas: -1}
"""

# heavy on validate's way when schedd checks the file; without schedd, pydantic and the spec
# models load, as they must
NOT_ON_VALIDATE = {"click", "asyncio", "sdbus", "shared.bus", "rich", "ctl.spec_cmd"}


def _validate_click() -> click.Command:
    command = cli.get_command(click.Context(cli), "validate")
    assert command is not None
    return command


PARSED = [
    ["validate", "web.zlayer.yml"],
    ["validate", "web.zlayer.yml", "--format", "json"],
    ["validate", "--format", "table", "web.zlayer.yml"],
    ["validate", "--format=json", "web.zlayer.yml"],
    ["validate", "web.zlayer.yml", "--format", "json", "--format", "table"],
]


@pytest.mark.parametrize("argv", PARSED, ids=" ".join)
def test_a_validate_command_line_parses_as_click_parses_it(argv: list[str]) -> None:
    parsed = readargs.parse(argv)
    assert parsed is not None
    command, values = parsed
    assert command is readargs.VALIDATE
    ctx = _validate_click().make_context("validate", argv[1:], parent=click.Context(cli))
    assert values == ctx.params


LEFT_TO_CLICK = [
    ["validate"],
    ["validate", "--format", "json"],
    ["validate", "-h"],
    ["validate", "--help"],
    ["validate", "a.yml", "b.yml"],
    ["validate", "--", "a.yml"],
    ["validate", "-"],
    ["validate", ""],
    ["validate", "a.yml", "--format", "yaml"],
    ["validate", "a.yml", "--format"],
    ["validate", "a.yml", "-x"],
]


@pytest.mark.parametrize("argv", LEFT_TO_CLICK, ids=" ".join)
def test_anything_else_of_validate_is_left_to_click(argv: list[str]) -> None:
    assert readargs.parse(argv) is None


CASES = {
    "valid": (["validate", "web.zlayer.yml"], 0),
    "valid, json": (["validate", "web.zlayer.yml", "--format", "json"], 0),
    "invalid": (["validate", "bad.zlayer.yml"], 1),
    "invalid, json": (["validate", "--format=json", "bad.zlayer.yml"], 1),
    "missing": (["validate", "gone.zlayer.yml"], 1),
    "a directory": (["validate", "."], 1),
    "empty": (["validate", "empty.zlayer.yml"], 1),
    # click strips ANSI codes from what it writes to a pipe: so does the way without it
    "escape in the name": (["validate", "b\x1b[31mad.zlayer.yml"], 1),
    "bad format": (["validate", "web.zlayer.yml", "--format", "xml"], 2),
    "no FILE, several here": (["validate"], 2),
}


@pytest.mark.parametrize("case", CASES)
def test_validate_says_what_the_click_command_says(case: str, tmp_path: Path) -> None:
    argv, code = CASES[case]
    (tmp_path / "web.zlayer.yml").write_text(VALID)
    (tmp_path / "bad.zlayer.yml").write_text(INVALID)
    (tmp_path / "b\x1b[31mad.zlayer.yml").write_text(INVALID)
    (tmp_path / "empty.zlayer.yml").write_text("")
    said = same_as_click(argv, no_daemons(tmp_path), tmp_path)
    assert said[0] == code, said
    assert "Traceback" not in said[2]
    if case == "escape in the name":
        # the problem lines, as click.echo wrote them (the last line is rich's, as before)
        assert said[2].startswith("bad.zlayer.yml:2:"), said


def test_validate_file_imports_no_click(tmp_path: Path) -> None:
    """Checked here (no schedd to ask): the spec models load, click does not."""
    spec = tmp_path / "web.zlayer.yml"
    spec.write_text(VALID)
    modules = modules_after(main_without_daemons(tmp_path), "validate", str(spec))
    assert "ctl.spec_check" in modules and "shared.spec" in modules
    assert sorted(NOT_ON_VALIDATE & modules) == []


def test_the_click_command_and_the_fast_body_share_their_names() -> None:
    from ctl import spec_check, spec_cmd

    assert spec_cmd.SPEC_PATTERNS is spec_check.SPEC_PATTERNS
    assert spec_cmd.find_spec_file is spec_check.find_spec_file
    assert spec_cmd.check_by_schedd is spec_check.check_by_schedd
