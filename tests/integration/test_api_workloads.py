"""The REST API's workload routes against the real six daemons: logs, exec (JSON and
WebSocket), jobs and cron, each answering what the bus answers and failing with the
CLI's sentence as a problem document.

apid runs with ``auth = "none"`` (every caller the admin "local", on 127.0.0.1
only): who may call what is the auth tests' subject.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.busybox_image import busybox_image, write_oci_archive
from tests.e2e.conftest import running_node
from tests.e2e.node import Node, wait_until
from tests.integration.test_apid_routes import apid_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root")

BUILD_LIMIT = 4 * 1024 * 1024  # apid's max_build_context_bytes in this module
DEPLOYMENT = "wl"
SPEC = """
version: v1
deployment: wl
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["echo out-one; echo err-one >&2; echo out-two; exec sleep 3600"]
    scale: {mode: fixed, replicas: 2}
  once:
    rtype: job
    image: zlayer/busybox:latest
    command: {entrypoint: ["sh", "-c", "echo job-ran"]}
  tick:
    rtype: cron
    schedule: "0 0 0 1 1 *"
    image: zlayer/busybox:latest
    command: {entrypoint: ["true"]}
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The six daemons with ``wl`` deployed: two replicas of web, a job and a cron job."""
    prefix = Path(tempfile.gettempdir()) / f"zlw-{os.getpid()}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZLAYER_APID_AUTH", "none")
        patch.setenv("ZLAYER_APID_MAX_BUILD_CONTEXT_BYTES", str(BUILD_LIMIT))
        with running_node(prefix, tmp_path_factory, network_tag="zlw") as started:
            spec = started.spec(DEPLOYMENT, SPEC)
            try:
                started.ctl("up", "-d", str(spec), "--timeout", "90", check=True)
                yield started
            finally:
                started.ctl("down", DEPLOYMENT)


@pytest.fixture(scope="module")
def base(node: Node) -> str:
    return f"http://127.0.0.1:{apid_port(node)}/api/v1"


async def call(
    method: str, url: str, *, body: Any = None, data: bytes | None = None, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.request(method, url, json=body, data=data, **kwargs) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def request(method: str, url: str, status: int, **kwargs: Any) -> Any:
    got, headers, data = asyncio.run(call(method, url, **kwargs))
    assert got == status, (got, data)
    if headers.get("Content-Type", "").startswith(("application/json", "application/problem")):
        return json.loads(data)
    return data


def problem(method: str, url: str, status: int, **kwargs: Any) -> str:
    got, headers, data = asyncio.run(call(method, url, **kwargs))
    assert got == status, (got, data)
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    document = json.loads(data)
    assert document["status"] == status and document["title"]
    assert "Traceback" not in document["detail"] and "\n" not in document["detail"]
    return str(document["detail"])


def runs_left(node: Node, service: str) -> bool:
    """Whether a container of ``service`` is still there (a run's goes after its end)."""
    return any(r["service"] == service for r in node.replicas(DEPLOYMENT))


def log_lines(url: str) -> list[dict[str, Any]]:
    raw = request("GET", url, 200)
    return [json.loads(line) for line in raw.decode().splitlines()]


# ---------------------------------------------------------------- logs


def test_logs_of_a_replica_its_tail_and_the_sentences_of_zlayerctl_logs(
    node: Node, base: str
) -> None:
    logs = f"{base}/deployments/{DEPLOYMENT}/services/web/logs"
    first = f"{DEPLOYMENT}-web-1-"

    def three() -> list[dict[str, Any]]:
        lines = log_lines(f"{logs}?replica=1")
        return lines if len(lines) >= 3 else []

    lines = wait_until(three, 30, "web-1 to write its three lines")
    # stdout keeps its order; stderr comes through its own pipe, so its place may vary
    assert [line["line"] for line in lines if line["stream"] == "stdout"] == ["out-one", "out-two"]
    assert [line["line"] for line in lines if line["stream"] == "stderr"] == ["err-one"]
    assert all(line["replica"].startswith(first) and line["time"] > 0 for line in lines)
    assert log_lines(f"{logs}?replica=1&tail=1") == lines[-1:]
    # zlayerctl logs reads the same files with the same reader (shared.logread)
    printed = node.ctl("logs", "web", "-d", DEPLOYMENT, "--instance", "1", check=True)
    assert printed.stdout.split() == ["out-one", "out-two"] and printed.stderr.split() == [
        "err-one"
    ]
    nothing = node.ctl("logs", "web", "-d", DEPLOYMENT, "--instance", "1", "-n", "0", check=True)
    assert nothing.stdout == nothing.stderr == ""
    both = log_lines(f"{logs}?tail=1")
    assert sorted(line["replica"].split("-")[2] for line in both) == ["1", "2"]

    detail = problem("GET", f"{logs}?replica=9", 404)
    assert detail == "web has no replica 9 (replicas: 1, 2)"
    detail = problem("GET", f"{base}/deployments/{DEPLOYMENT}/services/nope/logs", 404)
    assert detail == f"service nope of {DEPLOYMENT} has no replicas"
    assert "tail" in problem("GET", f"{logs}?tail=many", 400)


def test_following_logs_streams_what_a_replica_writes_next(node: Node, base: str) -> None:
    logs = f"{base}/deployments/{DEPLOYMENT}/services/web/logs?replica=2&follow=true&tail=0"
    exec_url = f"{base}/deployments/{DEPLOYMENT}/services/web/exec"

    async def follow() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession() as session,
            session.get(logs, timeout=aiohttp.ClientTimeout(total=60)) as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/x-ndjson"
            await asyncio.sleep(0.5)  # the follower has taken the file's end
            status, _headers, _data = await call(
                "POST",
                exec_url,
                body={"command": ["sh", "-c", "echo later-line > /proc/1/fd/1"], "replica": "2"},
            )
            assert status == 200
            async for raw in response.content:
                seen.append(json.loads(raw))
                if seen[-1]["line"] == "later-line":
                    return seen
        return seen

    seen = asyncio.run(follow())
    assert [line["line"] for line in seen] == ["later-line"]  # tail=0: nothing older
    assert seen[0]["replica"].startswith(f"{DEPLOYMENT}-web-2-")


# ---------------------------------------------------------------- exec


def test_exec_answers_exit_code_and_both_outputs_and_bounds_them(node: Node, base: str) -> None:
    exec_url = f"{base}/deployments/{DEPLOYMENT}/services/web/exec"
    result = request(
        "POST", exec_url, 200, body={"command": ["sh", "-c", "echo hi; echo oops >&2; exit 3"]}
    )
    assert result == {"exit_code": 3, "stdout": "hi\n", "stderr": "oops\n"}
    hostname = request("POST", exec_url, 200, body={"command": ["hostname"], "replica": "2"})
    assert hostname["exit_code"] == 0 and hostname["stdout"].strip()

    too_much = problem(
        "POST", exec_url, 422, body={"command": ["head", "-c", "17000000", "/dev/zero"]}
    )
    assert too_much.startswith("the command wrote more than 16 MiB")
    slow = problem("POST", f"{exec_url}?timeout=1", 504, body={"command": ["sleep", "30"]})
    assert slow.startswith("the command did not end within 1 s")
    assert problem("POST", exec_url, 400, body={"command": []}).startswith("the command is empty")
    # the bus would cut an argument at a NUL (this ran "echo a"): refused before it
    nul = problem("POST", exec_url, 400, body={"command": ["echo", "a\x00b"]})
    assert "NUL character" in nul
    assert "request body" in problem("POST", exec_url, 400, data=b"{not json")
    assert problem("POST", exec_url, 404, body={"command": ["true"], "replica": "7"}) == (
        "web has no replica 7 (replicas: 1, 2)"
    )


async def _ws_session(
    url: str,
    turns: list[list[bytes | str]],
    close_after: bytes | None = None,
    prompt: bytes = b"",
) -> tuple[bytes, Any]:
    """Send each turn's frames, binary ones for bytes and text ones for str, once
    ``prompt`` has shown in the output (the n-th turn once it has shown n times);
    collect output until the exit frame (or, with ``close_after``, close the socket once
    that is seen). A socket the server closed: the output and its close code."""
    output = b""
    pending = list(turns)
    sent = 0
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws,
    ):
        async with asyncio.timeout(30):
            while True:
                if pending and (not prompt or output.count(prompt) > sent):
                    for frame in pending.pop(0):
                        if prompt:  # a shell reading a terminal drops what it has not read yet
                            await asyncio.sleep(0.5)  # when it switches modes: type slowly
                        if isinstance(frame, str):
                            await ws.send_str(frame)
                        else:
                            await ws.send_bytes(frame)
                    sent += 1
                    continue
                message = await ws.receive()
                if message.type == aiohttp.WSMsgType.BINARY:
                    output += message.data
                    if close_after is not None and close_after in output:
                        await ws.close()
                        return output, None
                elif message.type == aiohttp.WSMsgType.TEXT:
                    return output, json.loads(message.data)
                else:
                    return output, ws.close_code


def test_exec_over_a_websocket_relays_stdin_output_and_the_exit_code(node: Node, base: str) -> None:
    ws = f"{base}/deployments/{DEPLOYMENT}/services/web/exec/ws".replace("http://", "ws://")
    output, final = asyncio.run(_ws_session(f"{ws}?command=sh", [[b"echo via-ws\n", b"exit 7\n"]]))
    assert output == b"via-ws\n" and final == {"exit_code": 7}

    output, final = asyncio.run(
        # The shell on a terminal asks where the cursor is after each prompt (ESC[6n).
        # The first line typed is an empty one: crun exec sets the command's terminal up
        # by reading its settings and writing them back, so a shell that made it raw in
        # between reads its first line with echo and line editing back on, and garbles
        # an answer to ESC[6n (seen once under a full run's load). The shell makes the
        # terminal raw again for each line. At the second prompt: answer, then type.
        _ws_session(
            f"{ws}?command=sh&tty=1&replica=2",
            [[b"\r"], [b"\x1b[1;5R", b"echo $((6*7))\r", b"exit 5\r"]],
            prompt=b"\x1b[6n",
        )
    )
    assert b"\r\n42\r\n" in output and final == {"exit_code": 5}

    # Closing the socket ends the command: cat reads its stdin's end, then says so.
    script = "echo ready; cat; echo cat-ended-by-close > /proc/1/fd/1"
    output, final = asyncio.run(
        _ws_session(f"{ws}?command=sh&command=-c&command={script}", [], close_after=b"ready")
    )
    assert output == b"ready\n" and final is None

    def ended() -> bool:
        lines = log_lines(f"{base}/deployments/{DEPLOYMENT}/services/web/logs?replica=1")
        return any(line["line"] == "cat-ended-by-close" for line in lines)

    wait_until(ended, 20, "the command to end once the socket closed")
    detail = problem("GET", ws.replace("ws://", "http://"), 400)
    assert detail.startswith("?command= is missing")


def test_exec_websocket_sizes_its_terminal_and_takes_resize_frames(node: Node, base: str) -> None:
    ws = f"{base}/deployments/{DEPLOYMENT}/services/web/exec/ws".replace("http://", "ws://")
    # crun exec --tty sizes the command's terminal just after starting it: ask until it has
    script = "until stty size 2>/dev/null; do sleep 0.05; done; read line; stty size"
    output, final = asyncio.run(
        _ws_session(
            f"{ws}?command=sh&command=-c&command={script}&tty=1&cols=91&rows=27",
            [['{"resize": {"cols": 100, "rows": 30}}', b"\r"]],
            prompt=b"27 91\r\n",
        )
    )
    # the size asked for is the command's; a resize frame is the terminal's, never its input
    # (the OCI runtime reads the size once, at the start: the second stty says the first size)
    assert output.startswith(b"27 91\r\n") and b"resize" not in output, output
    assert final == {"exit_code": 0}

    # text frames are no longer stdin: anything but a resize closes the socket
    output, final = asyncio.run(_ws_session(f"{ws}?command=cat", [["hello\n"]], prompt=b""))
    assert output == b"" and final == 1003
    half = problem("GET", f"{ws.replace('ws://', 'http://')}?command=sh&tty=1&cols=80", 400)
    assert half.startswith("give the terminal's size as both")


# ---------------------------------------------------------------- jobs and cron


def test_jobs_trigger_executions_and_last_run_logs(node: Node, base: str) -> None:
    run = request("POST", f"{base}/jobs/once/trigger?deployment={DEPLOYMENT}", 200)
    assert run["service"] == "once" and run["trigger"] == "manual"

    def finished() -> dict[str, Any] | None:
        runs = request("GET", f"{base}/jobs/once/executions?deployment={DEPLOYMENT}", 200)
        return next((r for r in runs if r["id"] == run["id"] and r["state"] != "running"), None)

    done = wait_until(finished, 30, "the job run to end")
    assert done["state"] == "succeeded" and done["exit_code"] == 0
    wait_until(lambda: not runs_left(node, "once"), 30, "the run's container to go")
    lines = log_lines(f"{base}/deployments/{DEPLOYMENT}/services/once/logs")
    assert [line["line"] for line in lines] == ["job-ran"]
    assert lines[0]["replica"] == f"{DEPLOYMENT}-once-{run['id']}"

    missing = problem("POST", f"{base}/jobs/once/trigger", 400)
    assert missing.startswith("?deployment= is missing")
    assert problem("POST", f"{base}/jobs/ghost/trigger?deployment={DEPLOYMENT}", 404)


def test_cron_list_disable_enable_and_trigger(node: Node, base: str) -> None:
    (listed,) = [c for c in request("GET", f"{base}/cron", 200) if c["service"] == "tick"]
    assert listed["deployment"] == DEPLOYMENT and listed["enabled"] is True
    off = request("PUT", f"{base}/cron/tick/disable?deployment={DEPLOYMENT}", 200)
    assert off["enabled"] is False
    (listed,) = request("GET", f"{base}/cron?deployment={DEPLOYMENT}", 200)
    assert listed["enabled"] is False
    assert request("PUT", f"{base}/cron/tick/enable?deployment={DEPLOYMENT}", 200)["enabled"]
    run = request("POST", f"{base}/cron/tick/trigger?deployment={DEPLOYMENT}", 200)
    assert run["service"] == "tick" and run["trigger"] == "manual"

    def finished() -> bool:
        runs = request("GET", f"{base}/jobs/tick/executions?deployment={DEPLOYMENT}", 200)
        return any(r["id"] == run["id"] and r["state"] == "succeeded" for r in runs)

    wait_until(finished, 30, "the cron run to end")
    wait_until(lambda: not runs_left(node, "tick"), 30, "the run's container to go")
    assert problem("PUT", f"{base}/cron/web/disable?deployment={DEPLOYMENT}", 404)


# ---------------------------------------------------------------- images and builds


def follow_operation(base: str, location: str) -> dict[str, Any]:
    origin = base.removesuffix("/api/v1")

    def ended() -> dict[str, Any] | None:
        info: dict[str, Any] = request("GET", origin + location, 200)
        return info if info["state"] != "running" else None

    found: dict[str, Any] = wait_until(ended, 60, f"{location} to end")
    return found


def test_images_list_inspect_pull_push_prune_and_logout(node: Node, base: str) -> None:
    images = request("GET", f"{base}/images", 200)
    assert any("docker.io/zlayer/busybox:latest" in i["names"] for i in images)
    detail = request("GET", f"{base}/images/zlayer%2Fbusybox%3Alatest", 200)
    assert "docker.io/zlayer/busybox:latest" in detail["image"]["names"]
    assert problem("GET", f"{base}/images/zlayer%2Fnever%3A1", 404)

    status, headers, data = asyncio.run(
        call("POST", f"{base}/images/pull", body={"reference": "registry.invalid/nope:1"})
    )
    assert status == 202, data
    ref = json.loads(data)
    assert ref["daemon"] == "registry" and headers["Location"].endswith(f"/registry/{ref['id']}")
    pulled = follow_operation(base, headers["Location"])
    assert pulled["state"] == "failed" and "registry.invalid" in pulled["error"]

    status, headers, data = asyncio.run(
        call(
            "POST",
            f"{base}/images/push",
            body={"reference": "zlayer/busybox:latest", "destination": "127.0.0.1:1/x/y:1"},
        )
    )
    assert status == 202, data
    assert follow_operation(base, headers["Location"])["state"] == "failed"
    assert "request body" in problem("POST", f"{base}/images/pull", 400, body={"ref": "x"})

    pruned = request("POST", f"{base}/system/prune", 200)  # busybox is in use by wl: it stays
    assert set(pruned) == {"images", "blobs", "bytes"}
    assert request("GET", f"{base}/images/zlayer%2Fbusybox%3Alatest", 200)

    detail = problem("DELETE", f"{base}/registry/login/nowhere.invalid", 404)
    assert detail == "no credentials were kept for nowhere.invalid"


def test_registry_login_refuses_what_is_no_host_name_before_reaching_out(
    node: Node, base: str
) -> None:
    for registry in ("foo bar", "host:99999", "user@host", "[zz]:5000", "-a.example"):
        login = {"registry": registry, "username": "u", "password": "p"}
        detail = problem("POST", f"{base}/registry/login", 400, body=login)
        assert detail == (
            f"{registry!r} is not a registry host name; give one like registry.example.com "
            "or host:5000"
        )
    empty = {"registry": "https://", "username": "u", "password": "p"}
    detail = problem("POST", f"{base}/registry/login", 400, body=empty)
    assert detail == "give a registry host name, like registry.example.com"


def context_tar(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return out.getvalue()


TAR = {"Content-Type": "application/x-tar"}


@pytest.mark.skipif(shutil.which("buildah") is None, reason="apt-get install buildah")
def test_build_from_an_uploaded_context_then_its_status_log_and_image(
    node: Node, base: str, tmp_path: Path
) -> None:
    archive = write_oci_archive(busybox_image(), tmp_path / "busybox.tar")
    zimagefile = (
        f'base: "oci-archive:{archive}"\n'
        "args: {RELEASE: dev}\n"
        "steps:\n"
        "  - copy: index.html\n"
        "    to: /www/index.html\n"
        '  - run: "echo release=$RELEASE >> /www/index.html"\n'
    )
    body = context_tar(
        {"index.html": b"built through the api\n", "ZImagefile": zimagefile.encode()}
    )
    query = "tag=zlayer/api-built:1&build_arg=RELEASE=7"
    status, headers, data = asyncio.run(
        call("POST", f"{base}/build?{query}", data=body, headers=TAR)
    )
    assert status == 202, data
    ref = json.loads(data)
    assert ref["daemon"] == "registry" and headers["Location"] == f"/api/v1/build/{ref['id']}"

    log = request("GET", f"{base}/build/{ref['id']}/logs?follow=true", 200).decode()
    info = request("GET", f"{base}/build/{ref['id']}", 200)
    assert info["state"] == "done", (info, log)
    assert "release=" in log
    assert "docker.io/zlayer/api-built:1" in json.loads(info["result"])["names"]

    exec_url = f"{base}/deployments/{DEPLOYMENT}/services/web/exec"
    assert request("POST", exec_url, 200, body={"command": ["true"]})["exit_code"] == 0
    removed = request("DELETE", f"{base}/images/zlayer%2Fapi-built%3A1", 200)
    assert removed
    assert problem("GET", f"{base}/images/zlayer%2Fapi-built%3A1", 404)


def test_build_refuses_hostile_or_malformed_contexts_with_a_sentence(node: Node, base: str) -> None:
    dockerfile = {"Dockerfile": b"FROM scratch\n"}
    device = tarfile.TarInfo("dev/tty")
    device.type = tarfile.CHRTYPE
    escaping = tarfile.TarInfo("../../etc/cron.d/evil")
    refused = {
        "../../etc/cron.d/evil points outside the context ('..')": context_tar(
            dockerfile, [escaping]
        ),
        "dev/tty is a device or a named pipe": context_tar(dockerfile, [device]),
        "the request body is not a complete tar archive": b"not a tar at all" * 100,
        "the request body is empty": b"",
    }
    for sentence, body in refused.items():
        detail = problem("POST", f"{base}/build?tag=zlayer/x:1", 400, data=body, headers=TAR)
        assert detail.startswith(sentence), detail
    tar = context_tar(dockerfile)
    detail = problem("POST", f"{base}/build?file=../Dockerfile", 400, data=tar, headers=TAR)
    assert detail == "?file= must name a file inside the context, not ../Dockerfile"
    # checked before the upload is read: the sentence names the file, not the body
    detail = problem("POST", f"{base}/build?zimagefile=/etc/x", 400, data=b"no tar", headers=TAR)
    assert detail == "?zimagefile= must name a file inside the context, not /etc/x"
    detail = problem("POST", f"{base}/build?tag=UPPER/Case", 400, data=tar, headers=TAR)
    assert detail
    detail = problem("POST", f"{base}/build", 415, data=tar, headers={"Content-Type": "text/x"})
    assert detail.startswith("send the build context as application/x-tar")
    assert problem("GET", f"{base}/build/999999", 404)


def test_build_context_beyond_max_build_context_bytes_is_refused(node: Node, base: str) -> None:
    dockerfile = {"Dockerfile": b"FROM scratch\n"}
    sent = context_tar({**dockerfile, "blob": os.urandom(BUILD_LIMIT)})
    detail = problem("POST", f"{base}/build", 413, data=sent, headers=TAR)
    assert detail == (
        "the build context is larger than 4 MiB; leave out what the build does not need"
    )
    # small as sent, beyond the limit once unpacked
    packed = gzip.compress(context_tar({**dockerfile, "zeros": bytes(BUILD_LIMIT)}))
    assert len(packed) < BUILD_LIMIT // 100
    gzipped = {"Content-Type": "application/gzip"}
    detail = problem("POST", f"{base}/build", 400, data=packed, headers=gzipped)
    assert detail == (
        "the build context holds more than 4 MiB; leave out what the build does not need"
    )
