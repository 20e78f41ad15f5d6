"""packaging/shelldocs.py, as the package build runs it: a man page for every command and
subcommand in the click tree, and click's completion scripts, which complete in a real bash."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ctl.main import LAZY_COMMANDS

REPO = Path(__file__).resolve().parents[2]
BASH = "usr/share/bash-completion/completions/zlayerctl"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("root")
    made = subprocess.run(
        [sys.executable, str(REPO / "packaging" / "shelldocs.py"), str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return out


def _commands(group: click.Group, ctx: click.Context, path: str) -> list[str]:
    names = []
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        assert sub is not None
        names.append(f"{path}-{name}")
        if isinstance(sub, click.Group):
            names += _commands(
                sub, click.Context(sub, info_name=name, parent=ctx), f"{path}-{name}"
            )
    return names


def test_every_command_has_a_man_page(root: Path) -> None:
    from ctl.cli import cli

    mandir = root / "usr/share/man/man1"
    pages = {p.name.removesuffix(".1.gz") for p in mandir.glob("*.1.gz")}
    assert {f"zlayerctl-{name}" for name in LAZY_COMMANDS} <= pages
    expected = {
        "zlayerctl",
        *_commands(cli, click.Context(cli, info_name="zlayerctl"), "zlayerctl"),
    }
    assert pages == expected
    up = gzip.decompress((mandir / "zlayerctl-up.1.gz").read_bytes()).decode()
    assert up.startswith('.TH "ZLAYERCTL UP" "1"')
    assert f"zlayerctl\\-up \\- {LAZY_COMMANDS['up'][1]}\n" in up
    assert "\\fB\\-b\\fP" in up
    if shutil.which("man"):
        shown = subprocess.run(
            ["man", "--warnings", "-l", str(mandir / "zlayerctl-validate.1.gz")],
            capture_output=True, text=True, env={**os.environ, "MANWIDTH": "80"},
        )  # fmt: skip
        assert shown.returncode == 0 and not shown.stderr, shown.stderr
        assert "zlayerctl-validate - Check a deployment spec" in " ".join(shown.stdout.split())


def test_each_shell_gets_clicks_completion(root: Path) -> None:
    for relative in (
        BASH,
        "usr/share/zsh/vendor-completions/_zlayerctl",
        "usr/share/fish/vendor_completions.d/zlayerctl.fish",
    ):
        assert "_ZLAYERCTL_COMPLETE=" in (root / relative).read_text(), relative


def test_bash_completes_a_command_name(root: Path) -> None:
    """``zlayerctl st<TAB>`` in bash: the packaged script asks zlayerctl for the words."""
    script = (
        f"source {root / BASH}\n"
        "COMP_WORDS=(zlayerctl st); COMP_CWORD=1\n"
        "_zlayerctl_completion zlayerctl st zlayerctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == sorted(n for n in LAZY_COMMANDS if n.startswith("st"))
