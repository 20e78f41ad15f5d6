"""Where zlayerctl sends a command: --host, ZLAYER_HOST, the current context, or the bus.

The contexts file is written by ``zlayerctl context`` itself (0600: it holds
tokens) and read back by the next command; a command given a host it cannot
reach, or plain http to another machine, says so in one sentence.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl import contexts, readargs
from ctl.contexts import Target, TargetError, check_host, target
from ctl.protocols import RegistryApi
from ctl.readargs import set_host_option, take_host_option
from ctl.remote import Http, RemoteRegistry
from ctl.transfer import Sent
from shared.clients import RegistryClient

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A config home of its own, no host in the environment and no --host given."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(contexts.HOST_ENV, raising=False)
    monkeypatch.delenv(contexts.TOKEN_ENV, raising=False)
    set_host_option(None)
    yield tmp_path / "config" / "zlayer"
    set_host_option(None)


def _ctl(
    home: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in (contexts.HOST_ENV, contexts.TOKEN_ENV)
    }
    environment["XDG_CONFIG_HOME"] = str(home)
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "ctl.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=REPO,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _write_contexts(directory: Path, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / readargs.CONTEXTS_FILE).write_text(text)


# ---------------------------------------------------------------- the global option


@pytest.mark.parametrize(
    ("argv", "rest", "host"),
    [
        (["--host", "http://127.0.0.1:1", "ps"], ["ps"], "http://127.0.0.1:1"),
        (["--host=https://node:3669", "ps", "-d", "web"], ["ps", "-d", "web"], "https://node:3669"),
        (["ps", "--host", "x"], ["ps", "--host", "x"], None),  # only before the command
        (["--host"], ["--host"], None),  # no value: click says what is missing
    ],
)
def test_the_host_option_is_taken_before_the_command(
    config: Path, argv: list[str], rest: list[str], host: str | None
) -> None:
    assert take_host_option(argv) == rest
    assert readargs._host_option == ([host] if host else [])


# ---------------------------------------------------------------- precedence


def test_nothing_set_is_the_local_bus(config: Path) -> None:
    assert target() is None
    _write_contexts(config, '[contexts.a]\nhost = "https://a:3669"\n')
    assert target() is None  # contexts, none current


def test_the_current_context_is_used_with_its_token_and_ca(config: Path) -> None:
    _write_contexts(
        config,
        'current = "a"\n[contexts.a]\nhost = "https://a:3669/"\ntoken = "tok-a"\n'
        'ca_file = "/etc/ca.pem"\n',
    )
    found = target()
    assert found is not None
    assert (found.host, found.token, found.ca_file, found.context) == (
        "https://a:3669",
        "tok-a",
        "/etc/ca.pem",
        "a",
    )
    assert "tok-a" not in repr(found)


def test_zlayer_host_wins_over_the_context_and_zlayer_token_goes_with_it(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_contexts(config, 'current = "a"\n[contexts.a]\nhost = "https://a:3669"\ntoken = "t"\n')
    monkeypatch.setenv(contexts.HOST_ENV, "https://b:3669")
    monkeypatch.setenv(contexts.TOKEN_ENV, "tok-b")
    found = target()
    assert found is not None and (found.host, found.token) == ("https://b:3669", "tok-b")


def test_the_host_option_wins_over_zlayer_host(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(contexts.HOST_ENV, "https://b:3669")
    set_host_option("https://c:3669")
    found = target()
    assert found is not None and found.host == "https://c:3669"


def test_a_host_given_without_a_token_takes_the_token_of_its_context(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_contexts(
        config,
        '[contexts.a]\nhost = "https://a:3669"\ntoken = "tok-a"\nca_file = "/ca"\n'
        '[contexts.b]\nhost = "https://b:3669"\ntoken = "tok-b"\n',
    )
    set_host_option("https://b:3669/")
    found = target()
    assert found is not None and (found.token, found.ca_file) == ("tok-b", "")
    monkeypatch.setenv(contexts.TOKEN_ENV, "from-env")
    found = target()
    assert found is not None and found.token == "from-env"


@pytest.mark.parametrize("host", ["http://127.0.0.1:3669", "http://[::1]:3669", "http://localhost"])
def test_plain_http_to_this_node_is_allowed(host: str) -> None:
    assert check_host(host) == host


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("http://node.example:3669", "plain http is allowed only to this node"),
        ("ftp://node", "is not an http(s) URL"),
        ("node:3669", "is not an http(s) URL"),
        ("https://node:port", "is not a URL"),
    ],
)
def test_a_host_zlayerctl_may_not_use_is_one_sentence(host: str, words: str) -> None:
    with pytest.raises(TargetError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_host(host)


def test_a_current_context_that_is_gone_is_one_sentence(config: Path) -> None:
    _write_contexts(config, 'current = "gone"\n')
    with pytest.raises(TargetError, match="the current context gone is not in"):
        target()


# ---------------------------------------------------------------- zlayerctl context


def test_context_add_use_ls_rm_round_trip(tmp_path: Path) -> None:
    home = tmp_path / "config"
    port = _closed_port()
    host = f"http://127.0.0.1:{port}"
    added = _ctl(home, "context", "add", "here", "--host", host, stdin="secret-token\n")
    assert added.returncode == 0, added.stderr
    path = home / "zlayer" / "contexts.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert 'token = "secret-token"' in path.read_text()

    # not current yet: ps still goes to the local bus (no daemons: the sentence for that)
    local = _ctl(home, "ps", env={"ZLAYER_PREFIX": str(tmp_path / "none")})
    assert "not running" in local.stderr

    used = _ctl(home, "context", "use", "here")
    assert used.returncode == 0, used.stderr
    listed = _ctl(home, "context", "ls")
    assert listed.stdout.split("\n")[1].split() == ["*", "here", host, "yes"]
    assert "secret-token" not in listed.stdout + listed.stderr

    # every command now goes to the context's host, which does not answer
    for argv in (["ps"], ["status"], ["ps", "--containers"], ["down", "web"]):
        result = _ctl(home, *argv)
        assert result.returncode == 1, (argv, result.stderr)
        assert f"cannot reach the ZLayer API at {host}" in result.stderr, (argv, result.stderr)
        assert result.stderr.count("\n") == 1

    removed = _ctl(home, "context", "rm", "here")
    assert removed.returncode == 0, removed.stderr
    assert "here" not in path.read_text()
    assert "current" not in path.read_text()


def test_context_add_reads_the_token_file_and_refuses_plain_http_elsewhere(
    tmp_path: Path,
) -> None:
    home = tmp_path / "config"
    token = tmp_path / "token"
    token.write_text("from-file\n")
    added = _ctl(
        home, "context", "add", "n", "--host", "https://n:3669", "--token-file", str(token)
    )
    assert added.returncode == 0, added.stderr
    assert 'token = "from-file"' in (home / "zlayer" / "contexts.toml").read_text()
    refused = _ctl(home, "context", "add", "m", "--host", "http://n:3669", "--no-token")
    assert refused.returncode == 1
    assert "plain http is allowed only to this node" in refused.stderr


def test_the_host_option_and_zlayer_host_reach_the_api_not_the_bus(tmp_path: Path) -> None:
    home = tmp_path / "config"
    host = f"http://127.0.0.1:{_closed_port()}"
    for argv, env in (
        (["--host", host, "ps"], {}),
        ([f"--host={host}", "events", "-n", "3"], {}),
        (["ps"], {"ZLAYER_HOST": host}),
        (["scale", "web", "2", "-d", "web"], {"ZLAYER_HOST": host}),
    ):
        result = _ctl(home, *argv, env=env)
        assert result.returncode == 1, (argv, result.stderr)
        assert f"cannot reach the ZLayer API at {host}" in result.stderr, (argv, result.stderr)
    bad = _ctl(home, "--host", "http://node.example:3669", "ps")
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: plain http is allowed only to this node")


def test_daemon_run_refuses_to_go_through_an_api(tmp_path: Path) -> None:
    host = f"http://127.0.0.1:{_closed_port()}"
    result = _ctl(tmp_path / "config", "--host", host, "daemon", "run", "--detach")
    assert result.returncode == 1
    assert result.stderr.startswith("error: `zlayerctl daemon` runs the daemons of this machine")
    assert result.stderr.count("\n") == 1


def test_the_remote_registry_is_no_bus_client_and_answers_every_registry_call() -> None:
    """It meets ``ctl.protocols.RegistryApi`` itself (mypy checks the types), with the bus
    client's parameters, and holds nothing that could fall through to D-Bus."""
    assert not issubclass(RemoteRegistry, RegistryClient)
    wanted = [
        name
        for name in dir(RegistryApi)
        if not name.startswith("_") and callable(getattr(RegistryApi, name))
    ]
    assert "build" in wanted and "receive" in wanted
    for name in wanted:
        ours = inspect.signature(getattr(RemoteRegistry, name))
        theirs = inspect.signature(getattr(RegistryClient, name))
        assert list(ours.parameters) == list(theirs.parameters), name


def test_a_path_given_the_remote_registry_is_sent_as_it_is(tmp_path: Path) -> None:
    """ctl.transfer takes the remote registry: nothing is piped to it (build sends its own tar)."""
    registry = RemoteRegistry(Http(Target("http://127.0.0.1:1", "t")))
    assert asyncio.run(Sent(registry).path(str(tmp_path))) == str(tmp_path)


def test_a_target_never_shows_its_token() -> None:
    assert "hidden" not in repr(Target("https://n:3669", "hidden"))
