"""Secrets on one node, driven through zlayerctl as a user would: a secret set, a service
whose env reads it with `$S:`, the value seen inside the replica and nowhere else; a
change rolls the service; cron jobs turned off and on."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl.supervisor import find_executable
from tests.e2e.node import Node, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.usefixtures("down_everything"),
]

FIRST = "first-Secret-Value-7f3a9c"
SECOND = "second-Secret-Value-b81e2d"
SCOPED = "scoped-Secret-Value-44c0aa"

APP = """
version: v1
deployment: {name}
services:
  app:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["trap 'exit 0' TERM; sleep 1000 & wait"]
    stop_grace_period: 2s
    env:
      DB_PASSWORD: $S:db-pass
      DB_URL: "postgres://app:$S:db-pass@db:5432/app"
    scale: {{mode: fixed, replicas: 1}}
  migrate:
    rtype: job
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["echo migrated"]
"""


@pytest.fixture
def down_everything(node: Node) -> Iterator[None]:
    yield
    listed = node.ctl("ps", "--format", "json")
    if listed.returncode == 0:
        for deployment in json.loads(listed.stdout):
            node.ctl("down", deployment["name"])
    for row in json.loads(node.ctl("secret", "ls", "--format", "json").stdout or "[]"):
        node.ctl("secret", "rm", row["name"], "-d", row["deployment"])


def set_secret(node: Node, name: str, value: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``zlayerctl secret set NAME`` with the value on stdin (not a terminal)."""
    result = subprocess.run(
        [find_executable("zlayerctl"), "secret", "set", name, *args],
        input=value,
        capture_output=True,
        text=True,
        timeout=60,
        env=node.env,
        cwd=node.workdir,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def read_some(fd: int) -> bytes:
    """What a terminal's other end has to read within half a second."""
    data = b""
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the terminal's last writer is gone
            break
        if not chunk:
            break
        data += chunk
    return data


def replica_env(node: Node, deployment: str) -> dict[str, str]:
    out = node.ctl("exec", "app", "-d", deployment, "--", "env", check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def running_revision(node: Node, deployment: str) -> int:
    """The revision of the one running replica of app, 0 while there is not exactly one."""
    running = [r for r in node.replicas(deployment) if r["state"] == "running"]
    return int(running[0]["revision"]) if len(running) == 1 else 0


def visible_text(node: Node, deployment: str, spec: Path) -> str:
    """Everything a user (or the logs) can read about the deployment, but the replica."""
    outputs = [
        node.ctl("spec", "dump", str(spec)).stdout,
        node.ctl("ps", "--format", "json").stdout,
        node.ctl("ps", "--containers", "--format", "json").stdout,
        node.ctl("ps").stdout,
        node.ctl("events", "-d", deployment, "--format", "json").stdout,
        node.ctl("status", "--format", "json").stdout,
        node.ctl("secret", "ls", "--format", "json").stdout,
        node.ctl("secret", "ls").stdout,
    ]
    logs = [p.read_text(errors="replace") for p in node.paths.log_dir.glob("*.log")]
    return "\n".join(outputs + logs)


def test_a_secret_reaches_the_replica_rolls_on_change_and_shows_nowhere_else(node: Node) -> None:
    stored = set_secret(node, "db-pass", FIRST)
    assert stored.returncode == 0, stored.stderr
    assert "secret db-pass (node-wide) set" in stored.stderr
    spec = node.spec("sec", APP.format(name="sec"))

    plan = node.ctl("deploy", "--dry-run", str(spec), check=True)
    node.ctl("up", "-d", str(spec), "--timeout", "90", check=True)
    env = replica_env(node, "sec")
    assert env["DB_PASSWORD"] == FIRST
    assert env["DB_URL"] == f"postgres://app:{FIRST}@db:5432/app"
    first_revision = running_revision(node, "sec")

    # Changing it rolls the service: a new replica with the new value replaces the old one.
    changed = set_secret(node, "db-pass", SECOND)
    assert changed.returncode == 0 and "changed (version 2)" in changed.stderr, changed.stderr
    wait_until(
        lambda: running_revision(node, "sec") > first_revision, 60, "the roll to the new value"
    )
    assert replica_env(node, "sec")["DB_PASSWORD"] == SECOND

    # The deployment's own secret wins over the node-wide one, and rolls it too.
    second_revision = running_revision(node, "sec")
    assert set_secret(node, "db-pass", SCOPED, "--deployment", "sec").returncode == 0
    wait_until(
        lambda: running_revision(node, "sec") > second_revision, 60, "the roll to the scoped one"
    )
    assert replica_env(node, "sec")["DB_PASSWORD"] == SCOPED

    # Only root, through `secret get`, reads a value back.
    got = node.ctl("secret", "get", "db-pass", "-d", "sec", check=True)
    assert got.stdout == SCOPED

    # Removing the scoped one rolls back to the node-wide value; the node-wide one, still
    # needed, is refused with a sentence naming the deployment.
    third_revision = running_revision(node, "sec")
    node.ctl("secret", "rm", "db-pass", "-d", "sec", check=True)
    wait_until(lambda: running_revision(node, "sec") > third_revision, 60, "the roll back")
    assert replica_env(node, "sec")["DB_PASSWORD"] == SECOND
    refused = node.ctl("secret", "rm", "db-pass")
    assert refused.returncode == 1
    assert "secret db-pass is used by deployment sec (app)" in refused.stderr

    # The job that reads no secret ran at the deploy only, not again with each roll.
    out = node.ctl("job", "status", "migrate", "-d", "sec", "--format", "json", check=True)
    assert [r["trigger"] for r in json.loads(out.stdout)] == ["deploy"]

    events = node.ctl("events", "-d", "sec").stdout
    assert "secret db-pass" in events
    seen = visible_text(node, "sec", spec) + plan.stdout + plan.stderr + refused.stderr + events
    for value in (FIRST, SECOND, SCOPED):
        assert value not in seen
    assert "$S:db-pass" in node.ctl("spec", "dump", str(spec)).stdout

    node.ctl("down", "sec", check=True)
    node.ctl("secret", "rm", "db-pass", check=True)
    assert json.loads(node.ctl("secret", "ls", "--format", "json").stdout) == []


def test_a_missing_secret_fails_the_deploy_with_one_sentence(node: Node) -> None:
    spec = node.spec("nosec", APP.format(name="nosec"))
    for command in (["up", "-d"], ["deploy", "--dry-run"]):
        failed = node.ctl(*command, str(spec))
        assert failed.returncode == 1
        assert "services.app.env.DB_PASSWORD: secret db-pass is not set" in failed.stderr
        assert "zlayerctl secret set db-pass" in failed.stderr
    assert "nosec" not in node.ctl("ps").stdout
    nul = set_secret(node, "db-pass", "a\0b")
    assert nul.returncode == 1 and "holds a NUL byte" in nul.stderr
    assert node.ctl("secret", "rm", "db-pass").returncode == 1
    assert "there is no node-wide secret db-pass" in node.ctl("secret", "rm", "db-pass").stderr


CRON = """
version: v1
deployment: crony
services:
  tick:
    rtype: cron
    schedule: "* * * * * *"
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["echo tick"]
"""


def runs(node: Node) -> set[str]:
    """The ids of tick's runs agentd lists (its last 20)."""
    out = node.ctl("job", "status", "tick", "-d", "crony", "--format", "json", check=True)
    return {run["id"] for run in json.loads(out.stdout)}


def test_a_disabled_cron_job_does_not_fire_until_enabled(node: Node) -> None:
    spec = node.spec("crony", CRON)
    node.ctl("deploy", str(spec), check=True)
    wait_until(lambda: runs(node), 30, "the first scheduled run")

    off = node.ctl("job", "cron", "disable", "tick", "-d", "crony", check=True)
    assert "cron job tick of crony disabled" in off.stderr
    (row,) = json.loads(node.ctl("job", "cron", "ls", "--format", "json", check=True).stdout)
    assert row["enabled"] is False and row["next_run"] is None
    table = node.ctl("job", "cron", "ls", check=True).stdout.splitlines()
    assert "ENABLED" in table[0] and table[1].split()[-2] == "no", table
    time.sleep(1.5)  # a run started as it was turned off may still be listed
    before = runs(node)
    time.sleep(3)
    assert runs(node) == before

    node.ctl("job", "cron", "enable", "tick", "-d", "crony", check=True)
    (row,) = json.loads(node.ctl("job", "cron", "ls", "--format", "json", check=True).stdout)
    assert row["enabled"] is True
    wait_until(lambda: runs(node) - before, 30, "a run after enabling")

    missing = node.ctl("job", "cron", "disable", "nope", "-d", "crony")
    assert missing.returncode == 1
    assert "deployment crony has no cron job named nope (cron jobs: tick)" in missing.stderr


def test_a_secret_changed_without_its_roll_is_rolled_by_the_loop(node: Node) -> None:
    """A set whose roll was never stored (schedd stopped between the two) is found by the
    reconcile loop, which rolls the service as the set would have."""
    from daemons.schedd.secrets import Secrets
    from daemons.schedd.store import Store
    from shared.nodekey import NodeKey

    assert set_secret(node, "db-pass", FIRST).returncode == 0
    spec = node.spec("drift", APP.format(name="drift"))
    node.ctl("up", "-d", str(spec), "--timeout", "90", check=True)
    first_revision = running_revision(node, "drift")

    # Only the store changes, as a schedd killed right after the write would leave it.
    store = Store(node.paths.daemon_state("schedd") / "state.db")
    try:
        Secrets(store, lambda: NodeKey.load(node.paths).secrets_key()).set("db-pass", "", SECOND)
    finally:
        store.close()
    wait_until(lambda: running_revision(node, "drift") > first_revision, 60, "the loop's roll")
    assert replica_env(node, "drift")["DB_PASSWORD"] == SECOND
    assert "secrets changed since the last roll (app)" in node.ctl("events", "-d", "drift").stdout


def test_a_value_from_a_file_or_typed_at_a_terminal_without_echo(node: Node) -> None:
    import pty

    source = node.workdir / "token.txt"
    source.write_text(FIRST + "\n")
    node.ctl("secret", "set", "from-file", "--from-file", str(source), check=True)
    assert node.ctl("secret", "get", "from-file", check=True).stdout == FIRST + "\n"

    # At a terminal the value is asked for twice and never echoed.
    controller, terminal = pty.openpty()
    try:
        typed = subprocess.Popen(
            [find_executable("zlayerctl"), "secret", "set", "typed"],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env=node.env,
            cwd=node.workdir,
            start_new_session=True,
        )
        shown = b""
        for prompt in (b"(not shown): ", b"again: "):
            deadline = time.monotonic() + 30
            while prompt not in shown:
                assert time.monotonic() < deadline, shown
                shown += read_some(controller)
            os.write(controller, SECOND.encode() + b"\n")
        assert typed.wait(timeout=60) == 0
        shown += read_some(controller)
    finally:
        os.close(controller)
        os.close(terminal)
    assert b"value of secret typed (not shown)" in shown
    assert SECOND.encode() not in shown
    assert node.ctl("secret", "get", "typed", check=True).stdout == SECOND
    for name in ("from-file", "typed"):
        node.ctl("secret", "rm", name, check=True)
