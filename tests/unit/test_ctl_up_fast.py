"""``zlayerctl up -b [FILE]`` runs without click (``ctl.readargs`` reads its command line,
``ctl.up_background`` runs it) and says what the click command says, with the same exit
codes; anything unusual, and a command for a node's API, still goes to click.

The runs against schedd are in ``tests/integration/test_up_background.py``.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctl import readargs
from ctl.main import cli
from tests.ctl_runs import main_without_daemons, no_daemons, same_as_click
from tests.fresh_interpreter import modules_after

SPEC = """\
version: v1
deployment: web
services:
  web:
    image: zlayer/busybox:latest
"""

INVALID = """\
version: v1
deployment: bad
services:
  web:
    image: zlayer/busybox:latest
    ports: [80]
"""


def _up_click() -> click.Command:
    command = cli.get_command(click.Context(cli), "up")
    assert command is not None
    return command


PARSED = [
    ["up", "-b"],
    ["up", "-b", "web.zlayer.yml"],
    ["up", "web.zlayer.yml", "-b"],
    ["up", "-b", "-b", "a.yml"],
    ["up", "-b", "-d", "a.yml"],
    ["up", "-b", "--timeout", "5", "a.yml"],
    ["up", "--timeout=2.5", "-b"],
]


@pytest.mark.parametrize("argv", PARSED, ids=" ".join)
def test_an_up_b_command_line_parses_as_click_parses_it(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _local(monkeypatch, tmp_path)
    parsed = readargs.parse(argv)
    assert parsed is not None
    command, values = parsed
    assert command is readargs.UP_BACKGROUND
    ctx = _up_click().make_context("up", argv[1:], parent=click.Context(cli))
    assert ctx.params["background"] is True
    assert values == {"file": ctx.params["file"]}


LEFT_TO_CLICK = [
    ["up"],
    ["up", "a.yml"],
    ["up", "-d", "a.yml"],
    ["up", "-bd"],
    ["up", "-b", "--help"],
    ["up", "-b", "-h"],
    ["up", "-b", "a.yml", "b.yml"],
    ["up", "-b", "--", "a.yml"],
    ["up", "-b", "-"],
    ["up", "-b", ""],
    ["up", "-b", "--timeout"],
    ["up", "-b", "--timeout", "soon"],
    ["up", "-b", "--timeout", "-1"],
    ["up", "-b=1"],
    ["up", "-b", "--detach"],
    ["up", "-b", "-x"],
]


@pytest.mark.parametrize("argv", LEFT_TO_CLICK, ids=" ".join)
def test_anything_else_of_up_is_left_to_click(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _local(monkeypatch, tmp_path)
    assert readargs.parse(argv) is None


def _local(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(readargs.HOST_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    readargs.set_host_option(None)


def test_up_b_for_a_nodes_api_is_left_to_click(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _local(monkeypatch, tmp_path)
    assert readargs.parse(["up", "-b", "a.yml"]) is not None
    monkeypatch.setenv(readargs.HOST_ENV, "https://node.example:3669")
    assert readargs.parse(["up", "-b", "a.yml"]) is None
    monkeypatch.delenv(readargs.HOST_ENV)
    readargs.set_host_option("https://node.example:3669")
    try:
        assert readargs.parse(["up", "-b", "a.yml"]) is None
    finally:
        readargs.set_host_option(None)
    # a contexts file whose current context cannot be read: click's path says so
    config = tmp_path / "config" / "zlayer"
    config.mkdir(parents=True)
    (config / readargs.CONTEXTS_FILE).write_text("current = [broken\n")
    assert readargs.parse(["up", "-b", "a.yml"]) is None


CASES = {
    "no daemons": (["up", "-b", "web.zlayer.yml"], 1),
    "no daemons, no FILE": (["up", "-b"], 1),
    "invalid file, no daemons": (["up", "-b", "bad.zlayer.yml"], 1),
    "missing file": (["up", "-b", "gone.zlayer.yml"], 1),
    "a directory": (["up", "-b", "."], 1),
    "bad option": (["up", "-b", "--timeout", "soon", "web.zlayer.yml"], 2),
    "extra argument": (["up", "-b", "web.zlayer.yml", "bad.zlayer.yml"], 2),
}


@pytest.mark.parametrize("case", CASES)
def test_up_b_says_what_the_click_command_says(case: str, tmp_path: Path) -> None:
    argv, code = CASES[case]
    (tmp_path / "web.zlayer.yml").write_text(SPEC)
    (tmp_path / "bad.zlayer.yml").write_text(INVALID)
    if case == "no daemons, no FILE":
        (tmp_path / "bad.zlayer.yml").unlink()
    env = no_daemons(tmp_path)
    fast = same_as_click(argv, env, tmp_path)
    assert fast[0] == code, fast
    assert fast[2].count("\n") == 1 or code == 2, fast  # one sentence, never a traceback
    assert "Traceback" not in fast[2]


def test_no_file_in_the_directory_is_said_as_click_says_it(tmp_path: Path) -> None:
    env = no_daemons(tmp_path)
    fast = same_as_click(["up", "-b"], env, tmp_path)
    assert fast[0] == 2 and "no *.zlayer.yml" in fast[2]


def test_up_b_imports_no_click(tmp_path: Path) -> None:
    """Up to the bus (here: none, so the daemons are said not to run) without click."""
    spec = tmp_path / "web.zlayer.yml"
    spec.write_text(SPEC)
    modules = modules_after(
        main_without_daemons(tmp_path),
        "up",
        "-b",
        str(spec),
    )
    assert "ctl.up_background" in modules
    heavy = {"click", "asyncio", "sdbus", "shared.bus", "pydantic", "rich", "ctl.deploy_cmd"}
    assert sorted(heavy & modules) == []


def test_the_spec_file_patterns_are_validates() -> None:
    from ctl import spec_cmd, up_background

    assert up_background.SPEC_PATTERNS == spec_cmd.SPEC_PATTERNS


@pytest.mark.parametrize("names", [[], ["a.zlayer.yml", "b.zlayer.yaml"], ["web.zlayer.yaml"]])
def test_without_file_the_spec_in_the_directory_is_found_as_click_finds_it(
    names: list[str], tmp_path: Path
) -> None:
    for name in names:
        (tmp_path / name).write_text(SPEC)
    (tmp_path / "dir.zlayer.yml").mkdir()  # a directory is no spec file
    env = no_daemons(tmp_path)
    fast = same_as_click(["up", "-b"], env, tmp_path)
    assert fast[0] == (1 if len(names) == 1 else 2), fast
    assert len(fast[2].splitlines()) == 1


def test_up_b_without_file_imports_no_click(tmp_path: Path) -> None:
    (tmp_path / "web.zlayer.yml").write_text(SPEC)
    modules = modules_after(
        main_without_daemons(tmp_path, f"os.chdir({str(tmp_path)!r})"),
        "up",
        "-b",
    )
    assert "ctl.up_background" in modules and "click" not in modules


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="/.ab", max_size=12))
def test_the_name_sent_is_the_one_pathlib_gives(file: str) -> None:
    from pathlib import PurePosixPath

    from ctl.up_background import path_name

    assert path_name(file) == str(PurePosixPath(file))
