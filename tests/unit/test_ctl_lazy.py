"""zlayerctl loads a command's module only when that command runs.

`zlayerctl --help` must still list every command with its one-line help, and
starting zlayerctl must not import the build formats, wasmtime, aiohttp or
the bus stack for commands that do not need them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ctl.main import LAZY_COMMANDS, cli
from ctl.supervisor import find_executable
from tests.fresh_interpreter import modules_after

REPO = Path(__file__).resolve().parents[2]
HEAVY = (
    "wasmtime",
    "aiohttp",
    "shared.buildfile",
    "shared.spec",
    "shared.bus",
    "sdbus",
    "pydantic",
    "rich.progress",
)
EVERY_COMMAND = {
    "build",
    "context",
    "daemon",
    "deploy",
    "dns",
    "down",
    "events",
    "exec",
    "export",
    "image",
    "job",
    "login",
    "node",
    "logout",
    "logs",
    "pipeline",
    "ps",
    "pull",
    "rollback",
    "routes",
    "runtimes",
    "scale",
    "secret",
    "spec",
    "status",
    "stop",
    "system",
    "token",
    "up",
    "validate",
    "wasm",
}


def _heavy(modules: set[str]) -> list[str]:
    return sorted(name for name in HEAVY if name in modules)


def test_help_lists_every_command_with_its_short_help() -> None:
    result = subprocess.run(
        [find_executable("zlayerctl"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 1) for line in result.stdout.split("Commands:\n", 1)[1].splitlines()]
    listed = {row[0]: row[1] for row in rows if len(row) == 2}
    assert set(listed) == EVERY_COMMAND
    for name, shown in listed.items():
        # click cuts a long line at a word and ends it with "..."
        full = LAZY_COMMANDS[name][1]
        assert shown == full or (shown.endswith("...") and full.startswith(shown[:-3])), name


@pytest.mark.parametrize("name", sorted(EVERY_COMMAND))
def test_each_listed_command_is_the_command_that_runs(name: str) -> None:
    """The table's module and short help are those of the real command."""
    ctx = click.Context(cli)
    command = cli.get_command(ctx, name)
    assert command is not None
    assert command.name == name
    assert command.get_short_help_str(limit=500) == LAZY_COMMANDS[name][1]


def test_importing_zlayerctl_imports_no_command() -> None:
    modules = modules_after("import ctl.main")
    assert _heavy(modules) == []
    assert not any(name.endswith("_cmd") for name in modules)


def test_help_imports_no_command() -> None:
    modules = modules_after("from ctl.main import main\nmain()", "--help")
    assert _heavy(modules) == []
    assert not any(name.endswith("_cmd") for name in modules)


def test_validate_imports_the_spec_and_nothing_for_images_or_the_bus(tmp_path: Path) -> None:
    # checked here: no schedd answers (where one does, it checks the spec and the models
    # are not loaded at all: tests/integration/test_validate_schedd.py)
    modules = modules_after(
        "import os\n"
        f"os.environ['ZLAYER_BUS_ADDRESS'] = 'unix:path={tmp_path}/no-bus'\n"
        "from ctl.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
        "validate",
        "examples/static-web.zlayer.yml",
    )
    assert "shared.spec" in modules
    # validate FILE runs without click (ctl.spec_check; tests/unit/test_ctl_validate_fast.py)
    assert "ctl.spec_check" in modules
    assert _heavy(modules) == ["pydantic", "shared.spec"]
    assert not {"ctl.build_cmd", "ctl.deploy_cmd", "ctl.wasm_cmd"} & modules
    # a spec without a cron job needs no croniter; a valid one printed to a pipe, no rich
    assert not {"croniter", "rich"} & modules


def test_status_imports_nothing_for_specs_builds_or_wasm(tmp_path: Path) -> None:
    modules = modules_after(
        "import os\n"
        f"os.environ['ZLAYER_PREFIX'] = {str(tmp_path)!r}\n"
        "from ctl.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
        "status",
    )
    assert "ctl.status_cmd" in modules
    assert not {"wasmtime", "aiohttp", "shared.buildfile", "shared.spec"} & modules
    # the supervisor's state file is read without pydantic or the daemons' scaffold
    assert not {"pydantic", "prometheus_client", "shared.daemon"} & modules
    assert not {"ctl.build_cmd", "ctl.deploy_cmd", "ctl.wasm_cmd", "ctl.registry_cmd"} & modules


@pytest.mark.parametrize(
    "argv",
    [
        ["ps"],
        ["ps", "--format", "json"],
        ["status", "--format", "json"],
        ["routes", "--format", "json"],
        ["dns"],
        ["image", "ls", "--format", "json"],
        ["events", "-n", "5"],
    ],
    ids=" ".join,
)
def test_read_commands_to_a_pipe_do_not_import_rich(tmp_path: Path, argv: list[str]) -> None:
    """No daemons here: each ends in the one-line error, which needs no rich either."""
    modules = modules_after(
        "import os\n"
        f"os.environ['ZLAYER_PREFIX'] = {str(tmp_path)!r}\n"
        "from ctl.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
        *argv,
    )
    assert "ctl.output" in modules
    assert "rich" not in modules


def test_plain_tables_and_lines_to_a_pipe_do_not_import_rich() -> None:
    code = (
        "from ctl.output import console, err_console, print_table\n"
        "print_table(['NAME', 'STATE'], [['web', '[green]running[/]'], ['db', 'stopped']])\n"
        "console.print('[dim]12:00:00[/] [bold]web[/] started', highlight=False)\n"
        "err_console.print('[yellow]warning:[/] ' + 'x' * 120, highlight=False)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code + "import sys; print('rich' in sys.modules)"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "NAME  STATE",
        "web   running",
        "db    stopped",
        "12:00:00 web started",
        "False",
    ]
    assert result.stderr == "warning: " + "x" * 120 + "\n"


@pytest.mark.parametrize(
    "markup",
    [
        "plain",
        "[green]running[/]",
        "[bold red]error:[/] it [broke]",
        "\\[not a tag]",
        "a\\\\[bold]b[/bold]",
        "[link=https://example.com]here[/link]",
        "[bold]a[italic]b[/bold]c[/italic]",
        "10.0.0.1:80 at 12:34:56",
        "list[str] and [1, 2]",
        "x [/] y",
        "[/bold]",
        "a :smile: b",
        "a :SMILE: b",
        "x:[b]y:smile:[/b]",
        "x:[b]:smile:[/b]",
        "ref:[bold]a:+1:[/bold]",
        "[green]10.0.0.1:5000/app:1[/]",
    ],
)
def test_plain_reads_markup_as_rich_does(markup: str) -> None:
    from rich.errors import MarkupError
    from rich.text import Text

    from ctl.output import plain

    try:
        expected: str | None = Text.from_markup(markup).plain
    except MarkupError:
        expected = None
    got = plain(markup)
    # None: left to rich (an error to raise, an emoji to draw)
    assert got == expected or got is None


@pytest.mark.parametrize(
    "markup",
    ["127.0.0.1:5000/bench/layers:1", "registry.example:443/team/app:v1.2", "10.0.0.1:80/x:y"],
)
def test_an_image_reference_is_read_without_rich(markup: str) -> None:
    from rich.text import Text

    from ctl.output import plain

    assert plain(markup) == Text.from_markup(markup).plain == markup


def test_the_emoji_name_characters_cover_richs_table() -> None:
    from rich._emoji_codes import EMOJI

    from ctl.output import _EMOJI_NAME_CHARACTERS

    assert set("".join(EMOJI)) <= _EMOJI_NAME_CHARACTERS
