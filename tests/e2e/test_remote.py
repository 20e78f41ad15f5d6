"""zlayerctl --host: the same commands through the node's REST API, the same results.

One node serves the module; its zlayer-apid listens on 127.0.0.1 (plain http
is allowed there) and an admin token is made with ``zlayerctl token create``,
as a user would. Each remote command runs in an environment that names no
prefix and no bus, so it can only reach the node through HTTP; its output and
exit code are compared with the same command run locally.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from ctl.supervisor import find_executable
from shared.busybox_image import busybox_image, write_oci_archive
from tests.e2e.node import Node, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.usefixtures("down_everything"),
]

REST_API = re.compile(r"REST API on (\S+):(\d+)")

SPEC = """
version: v1
deployment: remote
services:
  ticker:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - i=0; echo started $(hostname); echo warming >&2;
          while true; do i=$((i+1)); echo tick $i; sleep 0.3; done
    scale: {mode: fixed, replicas: 2}
"""


SHELL = """
version: v1
deployment: remote2
services:
  shell:
    image: zlayer/busybox:latest
    env:
      GREETING: $E:GREETING
      REVISION: "{revision}"
    command:
      entrypoint: ["sh", "-c"]
      args: ["exec sleep 1000"]
  fail3:
    rtype: job
    image: zlayer/busybox:latest
    command: {{entrypoint: ["sh", "-c", "echo working; exit 3"]}}
"""


@dataclass
class Remote:
    """zlayerctl --host URL with a token, in an environment without the node's prefix."""

    node: Node
    url: str
    token: str
    home: Path

    def env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("ZLAYER_PREFIX", "ZLAYER_BUS_ADDRESS", "ZLAYER_HOST", "ZLAYER_TOKEN")
        }
        env["XDG_CONFIG_HOME"] = str(self.home)
        env["ZLAYER_TOKEN"] = self.token if token is None else token
        env.update(extra)
        return env

    def argv(self, *args: str) -> list[str]:
        return [find_executable("zlayerctl"), "--host", self.url, *args]

    def ctl(
        self,
        *args: str,
        token: str | None = None,
        check: bool = False,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(token, **(env or {})),
            cwd=self.node.workdir,
        )
        assert "Traceback" not in result.stderr, result.stderr
        if check:
            assert result.returncode == 0, f"zlayerctl --host {' '.join(args)}: {result.stderr}"
        return result

    @contextlib.contextmanager
    def following(self, *args: str) -> Iterator[IO[str]]:
        """``zlayerctl --host URL args -f`` running, its output to read; when the body is
        done, Ctrl-C must end it quietly (exit 0, no traceback)."""
        follower = subprocess.Popen(
            self.argv(*args, "-f"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        )
        try:
            assert follower.stdout is not None
            yield follower.stdout
            follower.send_signal(signal.SIGINT)
            _, errors = follower.communicate(timeout=15)
            assert follower.returncode == 0, errors
            assert "Traceback" not in errors
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()


@pytest.fixture(scope="module")
def remote(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Remote:
    status = json.loads(node.ctl("status", "--format", "json", check=True).stdout)
    detail = next(row["detail"] for row in status if row["name"] == "apid")
    found = REST_API.search(detail)
    assert found, detail
    host, port = found.groups()
    assert host == "127.0.0.1"
    token = node.ctl("token", "create", "e2e-remote", "--role", "admin", check=True).stdout.strip()
    return Remote(node, f"http://127.0.0.1:{port}", token, tmp_path_factory.mktemp("config"))


def _same(node: Node, remote: Remote, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` locally and remotely; both must print and exit alike."""
    local = node.ctl(*args)
    through = remote.ctl(*args)
    assert (through.returncode, through.stdout, through.stderr) == (
        local.returncode,
        local.stdout,
        local.stderr,
    ), args
    return through


def _json_same(node: Node, remote: Remote, *args: str) -> Any:
    """``args --format json`` alike locally and remotely (asked again while it changes)."""

    def alike() -> tuple[Any] | None:
        local = json.loads(node.ctl(*args, "--format", "json", check=True).stdout)
        through = json.loads(remote.ctl(*args, "--format", "json", check=True).stdout)
        return (local,) if local == through else None  # a tuple: [] is an answer too

    return wait_until(alike, 30, f"{' '.join(args)} to read alike")[0]


def test_deploy_ps_logs_exec_scale_and_down_through_the_api(node: Node, remote: Remote) -> None:
    spec = node.spec("remote", SPEC)
    up = remote.ctl("up", "-d", str(spec), "--timeout", "90", check=True)
    assert "deployed revision 1 of remote" in up.stderr
    assert "remote is running" in up.stderr

    deployments = _json_same(node, remote, "ps")
    assert [d["name"] for d in deployments] == ["remote"]
    replicas = _json_same(node, remote, "ps", "--containers", "-d", "remote")
    assert len(replicas) == 2
    _same(node, remote, "ps", "-d", "remote")
    _same(node, remote, "events", "-d", "remote", "-n", "5")

    # logs: the history of one replica, of both (prefixed), and of the last lines
    wait_until(
        lambda: "tick 3" in node.ctl("logs", "ticker", "-d", "remote", "--instance", "2").stdout,
        30,
        "the ticker to tick",
    )
    remote_logs = remote.ctl("logs", "ticker", "-d", "remote", "--instance", "1", check=True)
    assert remote_logs.stdout.startswith("started remote-ticker-1"), remote_logs.stdout
    assert "warming" in remote_logs.stderr
    lines = remote.ctl("logs", "ticker", "-d", "remote", "-n", "2", check=True).stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["ticker-1"] * 2 + ["ticker-2"] * 2
    assert all(re.fullmatch(r"ticker-\d \| tick \d+", line) for line in lines), lines
    _same(node, remote, "logs", "nosuch", "-d", "remote")

    # logs -f: new lines keep coming until Ctrl-C, which ends it quietly
    with remote.following("logs", "ticker", "-d", "remote", "--instance", "1", "-n", "1") as out:
        first = out.readline()
        assert re.fullmatch(r"tick (\d+)\n", first), first
        seen = [first]
        deadline = time.monotonic() + 20
        while len(seen) < 4 and time.monotonic() < deadline:
            seen.append(out.readline())
        numbers = [int(line.split()[1]) for line in seen]
        assert numbers == list(range(numbers[0], numbers[0] + 4)), seen

    # exec: output and exit code as on the node, failures in the same sentence
    ran = _same(
        node,
        remote,
        "exec",
        "ticker",
        "-d",
        "remote",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    )
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "out\n", "err\n")
    _same(node, remote, "exec", "ticker", "-d", "remote", "--replica", "2", "--", "hostname")
    _same(node, remote, "exec", "ticker", "-d", "remote", "--replica", "7", "--", "true")
    _same(node, remote, "exec", "ticker", "-d", "remote", "--", "/no/such/command")
    # piped input is not forwarded through the API: one sentence, nothing run
    piped = remote.ctl("exec", "ticker", "-d", "remote", "--", "cat", stdin="hello\n")
    assert (piped.returncode, piped.stdout) == (1, "")
    assert piped.stderr.startswith("error: exec through the API does not forward standard input")
    assert piped.stderr.count("\n") == 1
    empty = remote.ctl("exec", "ticker", "-d", "remote", "--", "cat", stdin="")
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, "", "")

    # scale down waits until the surplus replica is gone, then up again
    scaled = remote.ctl("scale", "ticker", "1", "-d", "remote", check=True)
    assert scaled.stderr.endswith("scaled ticker of remote to 1\n"), scaled.stderr
    assert len(_json_same(node, remote, "ps", "--containers", "-d", "remote")) == 1
    remote.ctl("scale", "ticker", "2", "-d", "remote", check=True)

    down = remote.ctl("down", "remote", check=True)
    assert down.stderr.endswith("remote removed\n"), down.stderr
    assert _json_same(node, remote, "ps") == []
    _same(node, remote, "down", "remote")


def test_status_reads_the_daemons_as_on_the_node(node: Node, remote: Remote) -> None:
    keys = ("name", "state", "version", "pid", "unit")

    def rows(result: subprocess.CompletedProcess[str]) -> list[tuple[Any, ...]]:
        assert result.returncode == 0, result.stderr
        return [tuple(row[k] for k in keys) for row in json.loads(result.stdout)]

    assert rows(remote.ctl("status", "--format", "json")) == rows(
        node.ctl("status", "--format", "json")
    )
    table = remote.ctl("status", check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["DAEMON", "STATE", "VERSION"]
    assert [line.split()[:2] for line in table[1:]] == [
        [f"zlayer-{name}", "running"]
        for name in ("schedd", "agentd", "registryd", "overlayd", "proxyd", "apid")
    ]


def test_a_bad_or_missing_token_is_one_sentence(node: Node, remote: Remote) -> None:
    refused = remote.ctl("ps", token="not-a-token")
    assert refused.returncode == 1
    assert refused.stderr == (
        f"error: the API at {remote.url} refused the token: it is expired or revoked; "
        "make a new one with `zlayerctl token create`\n"
    )
    missing = remote.ctl("ps", token="")
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"error: the API at {remote.url} needs a token;")

    viewer = node.ctl("token", "create", "e2e-viewer", "--role", "viewer", check=True).stdout
    assert remote.ctl("ps", token=viewer.strip()).returncode == 0
    denied = remote.ctl("down", "anything", token=viewer.strip())
    assert denied.returncode == 1
    assert denied.stderr.startswith(f"error: the API at {remote.url} refused this to the token's")
    node.ctl("token", "revoke", "e2e-viewer", check=True)
    revoked = remote.ctl("ps", token=viewer.strip())
    assert "refused the token: it is expired or revoked" in revoked.stderr


def test_commands_that_need_the_node_s_files_say_so(node: Node, remote: Remote) -> None:
    archive = node.workdir / "nothing.tar"
    archive.write_bytes(b"")
    result = remote.ctl("image", "import", str(archive), "--name", "x:1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "works only on the node itself" in result.stderr


def _on_a_terminal(argv: list[str], env: dict[str, str], typed: bytes) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr; type ``typed``
    into it once the shell's prompt shows (the runtime flushes what is typed before it
    sets the terminal up); (exit code, what it printed) once it exits."""
    master, slave = pty.openpty()
    # a size no default has, so the command's `stty size` shows whether it travelled
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 111, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    printed = b""
    pending = typed
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if pending and b"# " in printed:
                os.write(master, pending)
                pending = b""
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the terminal's other end is gone
                break
            if not chunk:
                break
            printed += chunk
        return process.wait(timeout=30), printed.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def test_env_events_follow_and_a_terminal_through_the_api(node: Node, remote: Remote) -> None:
    spec = node.spec("remote2", SHELL.format(revision=1))
    # the $E: variable comes from the remote zlayerctl's environment, not the node's
    remote.ctl("up", "-d", str(spec), "--timeout", "60", check=True, env={"GREETING": "hi-there"})
    said = remote.ctl("exec", "shell", "-d", "remote2", "--", "sh", "-c", "echo $GREETING")
    assert (said.returncode, said.stdout) == (0, "hi-there\n")

    plan = remote.ctl(
        "deploy",
        "--dry-run",
        str(node.spec("remote2", SHELL.format(revision=2))),
        env={"GREETING": "hi-there"},
    )
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith("revision 2 of remote2 would:")

    # events -f: a deploy made meanwhile shows up; Ctrl-C ends it quietly
    with remote.following("events", "-d", "remote2", "-n", "1") as out:
        out.readline()  # the last event before following
        remote.ctl("deploy", str(spec), check=True, env={"GREETING": "hi-there"})
        deadline = time.monotonic() + 30
        seen = ""
        while "revision 2 of remote2 deployed" not in seen and time.monotonic() < deadline:
            seen += out.readline()
        assert "revision 2 of remote2 deployed" in seen, seen

    # exec -t: a shell on the WebSocket, typed into, its exit code returned
    wait_until(
        lambda: all(
            r["state"] == "running" and r["revision"] == 2
            for r in json.loads(node.ctl("ps", "--containers", "--format", "json").stdout)
            if r["deployment"] == "remote2"
        ),
        60,
        "revision 2 to run",
    )
    code, printed = _on_a_terminal(
        remote.argv("exec", "-t", "shell", "-d", "remote2", "--", "sh"),
        remote.env(),
        b"tty; stty size; echo typed-$((40+2)); exit 5\r",
    )
    assert code == 5, printed
    assert "typed-42" in printed and "/dev/pts/" in printed, printed
    assert "37 111" in printed, printed  # the client's terminal size reached the command
    local_code, _ = _on_a_terminal(
        [find_executable("zlayerctl"), "exec", "-t", "shell", "-d", "remote2", "--", "sh"],
        node.env,
        b"tty; echo typed-$((40+2)); exit 5\r",
    )
    assert local_code == code

    # a job run through the API: its exit code, its runs and its output as on the node
    ran = remote.ctl("job", "trigger", "fail3", "-d", "remote2", "--wait")
    assert ran.returncode == 3, ran.stderr
    assert re.fullmatch(r"run \S+ of fail3: failed, exit code 3\n", ran.stderr), ran.stderr
    runs = _json_same(node, remote, "job", "status", "fail3", "-d", "remote2")
    assert runs[0]["exit_code"] == 3  # newest first (each deploy ran it too)
    _same(node, remote, "logs", "fail3", "-d", "remote2")

    # rollback: the revision it makes, as on the node
    rolled = remote.ctl("rollback", "remote2", check=True)
    assert rolled.stderr.startswith("rolling remote2 back: revision 3 has the previous spec")

    remote.ctl("down", "remote2", check=True)


@pytest.mark.skipif(shutil.which("buildah") is None, reason="apt-get install buildah")
def test_build_sends_the_context_and_follows_the_build(
    node: Node, remote: Remote, tmp_path: Path
) -> None:
    # the base is read by the node's builder: an archive on the node (here, the same machine)
    archive = write_oci_archive(busybox_image(), tmp_path / "busybox.tar")
    context = tmp_path / "context"
    context.mkdir()
    (context / "hello.txt").write_text("sent over http\n")
    (context / "Dockerfile").write_text(
        f"FROM oci-archive:{archive}\nARG WORD\nCOPY hello.txt /hello.txt\n"
        "RUN echo $WORD >> /hello.txt\n"
    )
    built = remote.ctl(
        "build", str(context), "-t", "zlayer/remote-built:1", "--build-arg", "WORD=argued",
        timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    images = json.loads(node.ctl("image", "ls", "--format", "json", check=True).stdout)
    assert any("zlayer/remote-built:1" in " ".join(i["names"]) for i in images), images
    _same(node, remote, "image", "inspect", "zlayer/remote-built:1")

    outside = tmp_path / "Dockerfile.outside"
    outside.write_text("FROM zlayer/busybox:latest\n")
    refused = remote.ctl("build", str(context), "-f", str(outside), "-t", "x:1")
    assert refused.returncode == 1
    assert "is outside the build context" in refused.stderr
    assert refused.stderr.count("\n") == 1
    node.ctl("image", "rm", "zlayer/remote-built:1", check=True)


def test_up_follows_through_the_api_and_ctrl_c_takes_it_down(node: Node, remote: Remote) -> None:
    spec = node.spec("remote3", SHELL.replace("remote2", "remote3").format(revision=1))
    up = subprocess.Popen(
        remote.argv("up", str(spec)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=remote.env(GREETING="x"),
        cwd=node.workdir,
    )
    try:
        assert up.stderr is not None
        said = ""
        deadline = time.monotonic() + 60
        while "shell running 1/1" not in said and time.monotonic() < deadline:
            said += up.stderr.readline()
        assert "following events; Ctrl-C stops and removes the deployment" in said, said
        assert "shell running 1/1" in said, said
        up.send_signal(signal.SIGINT)
        _, rest = up.communicate(timeout=120)
        assert up.returncode == 0, said + rest
        assert rest.endswith("remote3 removed\n"), rest
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert "remote3" not in node.ctl("ps", "--format", "json", check=True).stdout
