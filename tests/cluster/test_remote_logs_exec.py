"""logs and exec across a three-node cluster: from n1, `zlayerctl logs` of a replica n2
runs shows its output (and `-f` follows it), `zlayerctl exec` in a replica n3 runs runs
there (its hostname, environment, stdin and exit code), the REST API's routes do the
same through n1's apid, and a node that died gives one sentence naming it to exec, while
logs show the other nodes' replicas and warn once that the dead node's are missing."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from typing import Any

import pytest

from ctl.supervisor import find_executable
from tests.cluster.harness import (
    TALK,
    Cluster,
    Node,
    listed_nodes,
    remove_deployment,
    talk_lines,
    wait_healthy,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 90.0
API = "http://127.0.0.1:3669"  # apid's default, inside each node's namespace


@pytest.fixture(scope="module")
def cluster(meshed_cluster: Cluster) -> Cluster:
    """The shared cluster: three nodes joined only through a router (replica traffic
    through the mesh), n3 behind NAT (an etcd client only: the one node whose death
    leaves etcd its quorum)."""
    return meshed_cluster


def started(node: Node, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """zlayerctl ARGS on ``node``, running (:func:`finished` waits for it)."""
    return subprocess.Popen(
        node.inside(find_executable("zlayerctl"), *args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or node.env,
        cwd=node.workdir,
    )


def finished(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    """Its exit code, stdout and stderr (no traceback in it)."""
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in err, err
    return process.returncode, out, err


def instance_on(rows: dict[str, list[dict[str, Any]]], node: Node) -> int:
    (row,) = rows[node.name]
    return int(row["instance"])


def follow_until(node: Node, lines: int, *args: str, deadline: float = 60) -> str:
    """What ``zlayerctl logs -f ARGS`` prints on ``node`` until it printed ``lines`` lines
    (or ``deadline`` seconds passed), then it is stopped (SIGINT, as a person's ^C)."""
    process = subprocess.Popen(
        node.inside(find_executable("zlayerctl"), "logs", "-f", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node.env,
        cwd=node.workdir,
    )
    assert process.stdout is not None
    shown: list[str] = []
    try:
        until = time.monotonic() + deadline
        while len(shown) < lines and time.monotonic() < until:
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            if ready:
                line = process.stdout.readline()
                if not line:
                    break
                shown.append(line)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in err, err
    return "".join(shown) + out


def on_terminal(node: Node, cols: int, rows: int, *args: str) -> tuple[str, int]:
    """What zlayerctl ARGS on ``node`` prints on a terminal of ``cols`` x ``rows`` that is
    its stdin and stdout, and its exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    process = subprocess.Popen(
        node.inside(find_executable("zlayerctl"), *args),
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=node.env,
        cwd=node.workdir,
    )
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: every holder of the terminal closed it
                    break
                if not data:
                    break
                shown += data
            elif process.poll() is not None:
                break
        code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    assert process.stderr is not None
    err = process.stderr.read().decode()
    process.stderr.close()
    assert "Traceback" not in err, err
    return shown.decode(errors="replace"), code


def test_logs_and_exec_reach_replicas_on_other_nodes(cluster: Cluster) -> None:
    n1, n2, n3 = cluster
    name = n1.deployment_name("talk")
    spec = n1.spec(name, TALK.format(name=name))
    try:
        n1.run("up", "-d", str(spec), "--timeout", "120", check=True)
        rows = wait_healthy(cluster.nodes, name, 3, time.monotonic() + SETTLE)
        assert sorted(len(found) for found in rows.values()) == [1, 1, 1], rows
        on_n2, on_n3 = instance_on(rows, n2), instance_on(rows, n3)
        host2, host3 = f"{name}-talk-{on_n2}", f"{name}-talk-{on_n3}"

        # logs of n2's replica, from n1: its own lines, in order
        # (the replica writes a line every 0.2 s: it may not have five yet when healthy)
        until = time.monotonic() + 30
        while True:
            out = n1.run("logs", "-d", name, "talk", "--instance", str(on_n2), "-n", "5")
            assert out.returncode == 0, out.stderr
            counted = talk_lines(out.stdout, host2)
            if len(counted) >= 5 or time.monotonic() > until:
                break
            time.sleep(1)
        assert len(counted) == 5 and counted == sorted(counted), out.stdout
        assert all(line.endswith(host2) for line in out.stdout.splitlines()), out.stdout

        # -f: lines written after the call come too
        followed = talk_lines(
            follow_until(n1, 5, "-d", name, "talk", "--instance", str(on_n2), "-n", "1"), host2
        )
        assert len(followed) >= 4 and followed == sorted(followed), followed
        assert followed[-1] > counted[-1], (counted, followed)

        # every replica at once: each node's lines, prefixed with its replica
        out = n1.run("logs", "-d", name, "talk", "-n", "2")
        assert out.returncode == 0, out.stderr
        for node in cluster:
            instance = instance_on(rows, node)
            prefix = f"talk-{instance} | "
            mine = [line for line in out.stdout.splitlines() if line.startswith(prefix)]
            assert len(mine) == 2, (node.name, out.stdout)
            assert all(line.endswith(f"{name}-talk-{instance}") for line in mine), out.stdout

        # exec in n3's replica, from n1: it runs there, with the spec's environment,
        # this stdin, and its exit code comes back (n3 is behind NAT: the call goes
        # to its mesh address)
        script = 'hostname; echo "$GREETING"; cat; echo oops >&2; exit 7'
        out = n1.run(
            "exec",
            "-d",
            name,
            "--replica",
            str(on_n3),
            "talk",
            "--",
            "sh",
            "-c",
            script,
            stdin="from-n1-stdin\n",
        )
        assert out.returncode == 7, out.stderr
        assert out.stdout.splitlines() == [host3, "hello-from-the-spec", "from-n1-stdin"], out
        assert out.stderr.strip() == "oops", out.stderr

        # with -t: this terminal's size is the command's there, its output comes here (the
        # command waits a moment first: the runtime sets its terminal up just after the
        # start, and what was written before may go)
        script = "sleep 1; until stty size 2>/dev/null; do sleep 0.05; done; hostname; sleep 1"
        shown, code = on_terminal(
            n1, 77, 19, "exec", "-t", "-d", name, "--replica", str(on_n3), "talk", "--",
            "sh", "-c", script,
        )  # fmt: skip
        assert code == 0, shown
        assert shown.split()[-3:] == ["19", "77", host3], shown

        # the REST API on n1 reaches them too (zlayerctl --host: its logs and exec routes)
        token = n1.run("token", "create", "remote-test", "--role", "operator", check=True)
        api_env = dict(n1.env, ZLAYER_TOKEN=token.stdout.strip())
        api_env["XDG_CONFIG_HOME"] = str(n1.workdir / "config")
        out = n1.run(
            "--host",
            API,
            "logs",
            "-d",
            name,
            "talk",
            "--instance",
            str(on_n2),
            "-n",
            "3",
            env=api_env,
        )
        assert out.returncode == 0, out.stderr
        assert len(talk_lines(out.stdout, host2)) == 3, out.stdout
        out = n1.run(
            "--host",
            API,
            "exec",
            "-d",
            name,
            "--replica",
            str(on_n3),
            "talk",
            "--",
            "sh",
            "-c",
            'hostname; echo "$GREETING"; echo bad >&2; exit 3',
            env=api_env,
        )
        assert out.returncode == 3, out.stderr
        assert out.stdout.splitlines() == [host3, "hello-from-the-spec"], out.stdout
        assert out.stderr.strip() == "bad", out.stderr

        # a node that died: one sentence naming it (before its lease lapses), or its
        # replica already gone from the listing; never a traceback
        listing = json.loads(
            n1.run("ps", "--containers", "-d", name, "--format", "json", check=True).stdout
        )
        n3_id = next(r["node"] for r in listing if r["instance"] == on_n3)
        n3.kill()
        # All at once, before n3's lease lapses: the logs of every replica (the API's
        # merged stream, on the node, and through the API as zlayerctl --host reads
        # them) show n1's and n2's and warn once that n3's are missing; exec in n3's
        # fails with one sentence naming the node.
        logs_url = f"{API}/api/v1/deployments/{name}/services/talk/logs?tail=2"
        auth = f"Authorization: Bearer {api_env['ZLAYER_TOKEN']}"
        calls = {
            "api": subprocess.Popen(
                n1.inside("curl", "-sS", "-D", "/dev/stderr", "-H", auth, logs_url),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            "logs": started(n1, "logs", "-d", name, "talk", "-n", "2"),
            "exec": started(n1, "exec", "-d", name, "--replica", str(on_n3), "talk", "--", "true"),
            "host": started(n1, "--host", API, "logs", "-d", name, "talk", "-n", "2", env=api_env),
        }
        done = {what: finished(process) for what, process in calls.items()}
        alive = [f"{name}-talk-{instance_on(rows, node)}" for node in (n1, n2)]
        # A call that located the replicas after n3's were moved to a live node (its
        # failover, within seconds under load) reads the new copy's lines, rightly
        # with no warning; one that found n3's warns once, and shows none of them.
        after = json.loads(
            n1.run("ps", "--containers", "-d", name, "--format", "json", check=True).stdout
        )
        moved = any(r["instance"] == on_n3 and r["node"] != n3_id for r in after)
        code, _, said = done["exec"]
        if code == 0:  # it ran in the new copy, on a live node
            assert moved, done["exec"]
        else:
            said = said.strip()
            assert said.count("\n") == 0, said
            assert f"node {n3.name} (" in said and "does not answer" in said, (said, n3_id)
        warnings = 0
        for what in ("logs", "host", "api"):
            code, out, err = done[what]
            if what == "api":
                assert code == 0 and err.startswith("HTTP/1.1 200"), err
                out = "\n".join(json.loads(line)["line"] for line in out.splitlines())
                warned = [line for line in err.splitlines() if line.lower().startswith("warning:")]
            else:
                assert code == 0, (what, err)
                warned = [line for line in err.splitlines() if line.startswith("warning:")]
            for host in alive:
                assert len(talk_lines(out, host)) == 2, (what, out)
            if not warned:
                assert moved, (what, out, err)
                continue
            warnings += 1
            assert talk_lines(out, host3) == [], (what, out)
            assert len(warned) == 1 and f"node {n3.name} (" in warned[0], (what, err)
            assert "does not answer" in warned[0] and host3 in warned[0], (what, err)
        assert warnings, "every logs call ran after n3's replica had moved: none saw it dead"
    finally:
        if not n3.alive:
            n3.restart()
            deadline = time.monotonic() + 60
            while listed_nodes(n1).get(n3.name) != "ready":
                assert time.monotonic() < deadline, f"{n3.name} is not listed ready again"
                time.sleep(0.5)
        remove_deployment(n1, name)
