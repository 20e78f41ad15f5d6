"""``zlayerctl pull IMAGE`` runs without click (``ctl.readargs`` reads its command line,
``ctl.registry_jobs.pull`` runs it) and says what the click command says, with the same
exit codes; anything unusual (``--help``, a usage error) still goes to click.

The pulls against a real registryd are in ``tests/integration/test_registry_pull.py``
and ``tests/integration/test_ctl_pull_bus.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest

from ctl import readargs, registry_jobs
from ctl.main import cli
from tests.ctl_runs import main_without_daemons, no_daemons, same_as_click
from tests.fresh_interpreter import modules_after


def _pull_click() -> click.Command:
    command = cli.get_command(click.Context(cli), "pull")
    assert command is not None
    return command


PARSED = [
    ["pull", "nginx"],
    ["pull", "registry.example:5000/a/b:1", "--format", "json"],
    ["pull", "--format=json", "nginx"],
    ["pull", "--policy", "newer", "nginx"],
    ["pull", "nginx", "--policy=if_not_present", "--format", "table"],
    ["pull", "--policy", "never", "--policy", "always", "nginx"],
    ["pull", "nginx@sha256:" + "a" * 64],
]


@pytest.mark.parametrize("argv", PARSED, ids=" ".join)
def test_a_pull_command_line_parses_as_click_parses_it(argv: list[str]) -> None:
    parsed = readargs.parse(argv)
    assert parsed is not None
    command, values = parsed
    assert command is readargs.PULL
    ctx = _pull_click().make_context("pull", argv[1:], parent=click.Context(cli))
    assert values == ctx.params


LEFT_TO_CLICK = [
    ["pull"],
    ["pull", ""],
    ["pull", "a", "b"],
    ["pull", "--help"],
    ["pull", "-h"],
    ["pull", "nginx", "--help"],
    ["pull", "--", "nginx"],
    ["pull", "-", "nginx"],
    ["pull", "nginx", "--policy"],
    ["pull", "nginx", "--policy", "sometimes"],
    ["pull", "nginx", "--policy", "Always"],
    ["pull", "nginx", "--policy=NEVER"],
    ["pull", "nginx", "--format", "yaml"],
    ["pull", "nginx", "--format", "-"],
    ["pull", "nginx", "--pol", "newer"],
    ["pull", "nginx", "-x"],
]


@pytest.mark.parametrize("argv", LEFT_TO_CLICK, ids=" ".join)
def test_anything_else_of_pull_is_left_to_click(argv: list[str]) -> None:
    assert readargs.parse(argv) is None


def test_the_options_and_policies_are_those_of_the_click_command() -> None:
    command = _pull_click()
    options = {
        name: param.name
        for param in command.params
        if isinstance(param, click.Option)
        for name in param.opts
    }
    assert options == {option: spec[0] for option, spec in readargs.PULL.options.items()}
    policy = next(p for p in command.params if p.name == "policy")
    assert tuple(policy.type.choices) == readargs.POLICIES == registry_jobs.POLICIES  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in command.params if isinstance(p, click.Option)}
    assert defaults == {k: v for k, v in readargs.PULL.defaults.items() if k != "image_name"}


CASES = {
    "no daemons": (["pull", "nginx"], 1),
    "no daemons, json": (["pull", "--format", "json", "nginx"], 1),
    "not a reference": (["pull", "Not A Name"], 1),
    "bad policy": (["pull", "nginx", "--policy", "sometimes"], 2),
    "extra argument": (["pull", "nginx", "busybox"], 2),
    "no image": (["pull"], 2),
}


@pytest.mark.parametrize("case", CASES)
def test_pull_says_what_the_click_command_says(case: str, tmp_path: Path) -> None:
    argv, code = CASES[case]
    env = no_daemons(tmp_path)
    fast = same_as_click(argv, env)
    assert fast[0] == code, fast
    assert fast[2].count("\n") == 1 or code == 2, fast  # one sentence, never a traceback
    assert "Traceback" not in fast[2]


def test_pull_imports_no_click(tmp_path: Path) -> None:
    """Up to the bus (here: none, so the daemons are said not to run) without click."""
    modules = modules_after(
        main_without_daemons(tmp_path),
        "pull",
        "busybox",
        "--format",
        "json",
    )
    assert "ctl.registry_jobs" in modules
    heavy = {"click", "asyncio", "sdbus", "shared.bus", "pydantic", "rich", "ctl.registry_cmd"}
    assert sorted(heavy & modules) == []


def test_pull_imports_no_inspect_or_dataclasses(tmp_path: Path) -> None:
    """Reading the user's credential for the image's registry (an auth file that has one,
    so json and base64 are used) leaves out dataclasses and the inspect, ast and dis it
    imports: they were a good part of a warm pull's start-up."""
    auth_file = tmp_path / "config" / "containers" / "auth.json"
    auth_file.parent.mkdir(parents=True)
    auth_file.write_text('{"auths": {"registry.example:5000": {"auth": "dTpw"}}}')  # u:p
    modules = modules_after(
        main_without_daemons(
            tmp_path,
            "os.environ.pop('REGISTRY_AUTH_FILE', None)",
            "os.environ.pop('XDG_RUNTIME_DIR', None)",
        ),
        "pull",
        "registry.example:5000/a/b:1",
        "--format",
        "json",
    )
    assert {"shared.credentials", "shared.reference", "json", "base64"} <= modules
    assert sorted({"inspect", "dataclasses", "ast", "dis"} & modules) == []


def test_pull_reads_credentials_without_pathlib(tmp_path: Path) -> None:
    """The user's auth files are found as path strings: pathlib, and the urllib.parse and
    ipaddress it imports, are not loaded for them. Run as an installed zlayerctl runs (the
    packages on the path, no site: a checkout's editable-install finder loads pathlib)."""
    import json
    import subprocess
    import sys
    import sysconfig

    auth_file = tmp_path / "config" / "containers" / "auth.json"
    auth_file.parent.mkdir(parents=True)
    auth_file.write_text('{"auths": {"registry.example:5000": {"auth": "dTpw"}}}')  # u:p
    code = (
        "import sys\n"
        "sys.argv = ['zlayerctl', 'pull', 'registry.example:5000/a/b:1', '--format', 'json']\n"
        + main_without_daemons(tmp_path, "os.environ.pop('REGISTRY_AUTH_FILE', None)")
        + "\nimport json\nprint('MODULES', json.dumps(sorted(sys.modules)))"
    )
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**os.environ, "PYTHONPATH": f"{repo}:{sysconfig.get_paths()['purelib']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    modules = set(json.loads(result.stdout.rsplit("MODULES ", 1)[1]))
    assert {"shared.credentials", "json", "base64"} <= modules
    assert sorted({"pathlib", "urllib.parse", "ipaddress"} & modules) == []


def test_auth_for_reads_the_users_credential_for_the_images_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth_file = tmp_path / "auth.json"
    auth_file.write_text('{"auths": {"registry.example:5000": {"auth": "dTpw"}}}')  # u:p
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    assert registry_jobs.auth_for("registry.example:5000/a/b:1") == "dTpw"


def test_references_and_credentials_are_immutable_values() -> None:
    """As the frozen dataclasses they replace: equal and hashed by value, immutable,
    copied and pickled whole; a credential's repr keeps its password out of logs."""
    import copy
    import pickle

    from shared.credentials import Credential
    from shared.reference import Reference, parse_reference

    ref = parse_reference("busybox")
    assert ref == Reference("docker.io", "library/busybox", "latest")
    assert ref != Reference("docker.io", "library/busybox", None)
    assert ref != ("docker.io", "library/busybox", "latest", None)
    assert len({ref, parse_reference("docker.io/library/busybox:latest")}) == 1
    assert copy.deepcopy(ref) == ref == pickle.loads(pickle.dumps(ref))
    assert repr(ref) == (
        "Reference(domain='docker.io', path='library/busybox', tag='latest', digest=None)"
    )
    cred = Credential("alice", "s3cret")
    assert cred == Credential("alice", "s3cret") != Credential("alice", "other")
    assert hash(cred) == hash(Credential("alice", "s3cret"))
    assert copy.copy(cred) == cred == pickle.loads(pickle.dumps(cred))
    assert "s3cret" not in repr(cred)
    assert "alice" in repr(cred)
    for value, field in ((ref, "tag"), (cred, "password")):
        with pytest.raises(AttributeError):
            setattr(value, field, "x")
        with pytest.raises(AttributeError):
            delattr(value, field)
    assert ref.tag == "latest" and cred.password == "s3cret"
