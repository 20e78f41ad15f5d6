"""The repository's top level holds what it should and nothing else.

A stray file at the root (an empty ``oom`` from a process run there, a log
redirected to the wrong place) is easy to commit by accident; these tests fail
on one, in git's index and in the working tree alike.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = frozenset(
    {
        ".ci",
        ".gitignore",
        "README.md",
        "bench",
        "ctl",
        "daemons",
        "examples",
        "packaging",
        "pyproject.toml",
        "scripts",
        "shared",
        "tests",
        "units",
    }
)


def _git(*args: str) -> str:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    # check-ignore answers 1 when nothing it was asked about is ignored.
    assert result.returncode in (0, 1), result.stderr
    return result.stdout


def test_git_tracks_only_the_expected_top_level() -> None:
    tracked = {line.split("/", 1)[0] for line in _git("ls-files", "-z").split("\0") if line}
    assert tracked - EXPECTED == set(), "unexpected files at the repository root"


def test_the_working_tree_has_no_stray_top_level_files() -> None:
    present = {entry.name for entry in ROOT.iterdir()} - EXPECTED - {".git"}
    # What .gitignore covers (the venv, caches, build output) may come and go.
    ignored = set(_git("check-ignore", "--no-index", *sorted(present)).split() if present else [])
    assert present - ignored == set(), "stray files at the repository root"
