"""The daemons agree with schedd after stops, restarts and fixes, as a user meets them.

Each test replays one of the ways the copies of the truth used to drift apart
(issue 8's observations) through zlayerctl and checks what the user sees:
``ps``, ``dns``, ``routes``, pages served, exit codes and sentences.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from pathlib import Path

import pytest

from shared.bus import open_bus, resolve_bus_address
from shared.busybox_image import busybox_image, write_oci_layout
from shared.clients import SchedulerClient
from shared.proc import alive
from shared.wire.jobs import JobInfo
from tests.e2e.node import IMAGE, Node, free_port, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root")

WEB = """
version: v1
deployment: {name}
services:
  web:
    image: {image}
    command:
      entrypoint: ["sh", "-c"]
      args:
        - mkdir -p /www && echo {page}-$(hostname) > /www/index.html &&
          exec httpd -f -p 8080 -h /www
    endpoints:
      - name: http
        protocol: http
        port: {port}
        target_port: 8080
        host: {host}
        expose: public
    scale: {{mode: fixed, replicas: {replicas}}}
    stop_grace_period: 2s
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""


def web(
    node: Node,
    name: str,
    port: int,
    replicas: int = 2,
    page: str = "hello",
    image: str = IMAGE,
    host: str = "shop.test",
) -> Path:
    body = WEB.format(name=name, port=port, replicas=replicas, page=page, image=image, host=host)
    return node.spec(name, body)


def get(port: int, host: str = "shop.test") -> str:
    """A page through proxyd, by Host header."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET /index.html HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def dns_names(node: Node) -> dict[str, list[str]]:
    rows = json.loads(node.ctl("dns", "--format", "json", check=True).stdout)
    return {r["name"]: sorted(r["addresses"]) for r in rows}


def routes_of(node: Node, deployment: str) -> list[dict[str, object]]:
    rows = json.loads(node.ctl("routes", "--format", "json", check=True).stdout)
    return [r for r in rows if r["deployment"] == deployment]


def restart_all(node: Node) -> None:
    node.ctl("daemon", "stop", check=True)
    node.ctl("daemon", "run", "--detach", check=True)
    wait_until(lambda: node.ctl("status").returncode == 0, 60, "all six daemons to run")


def agentd_log(node: Node, since: int = 0) -> str:
    """What agentd wrote under the supervisor (its stderr goes to a file per daemon),
    from byte ``since`` on: the module's tests share the node and so the file."""
    path = node.paths.log_dir / "agentd.log"
    if not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(since)
        return handle.read().decode(errors="replace")


def agentd_log_end(node: Node) -> int:
    """Where agentd's log ends now: what a test reads of it starts there."""
    path = node.paths.log_dir / "agentd.log"
    return path.stat().st_size if path.exists() else 0


def test_a_removed_deployment_leaves_no_name_or_route_and_its_route_is_free_again(
    restarted_node: Node,
) -> None:
    """Observation 2: up, down, stop and start the daemons; no DNS name or route of the
    removed deployment is left, and a new deployment takes its host and path at once."""
    node = restarted_node
    port = free_port()
    node.ctl("up", "-d", str(web(node, "web", port, page="old")), check=True)
    assert "web.service.local" in dns_names(node)
    assert get(port).endswith("\n") and "old-" in get(port)

    down = node.ctl("down", "web", check=True)
    assert "web removed" in down.stderr
    # down waited: nothing of it runs, nothing routes to it.
    assert node.ctl("ps", "--format", "json", check=True).stdout.strip() == "[]"
    assert routes_of(node, "web") == []
    assert "web.service.local" not in dns_names(node)

    restart_all(node)
    assert "web.service.local" not in dns_names(node)
    assert routes_of(node, "web") == []

    # Another deployment on the same host, path and port is served, not refused.
    node.ctl("up", "-d", str(web(node, "shop", port, page="new")), check=True)
    assert "new-" in get(port)
    assert routes_of(node, "web") == []
    node.ctl("down", "shop", check=True)


def test_replicas_running_across_a_stop_and_start_of_every_daemon_are_adopted(
    restarted_node: Node,
) -> None:
    """Observations 4 and 7: replicas keep their containers, PIDs and restart counts
    across a stop and start of all six daemons, several times over, and serve throughout."""
    node = restarted_node
    port = free_port()
    log_from = agentd_log_end(node)
    node.ctl("up", "-d", str(web(node, "web", port, replicas=3)), check=True)
    before = {r["id"]: (r["pid"], r["restarts"]) for r in node.replicas("web")}
    assert len(before) == 3

    for _cycle in range(3):
        restart_all(node)
        node.ctl("up", "-d", str(web(node, "web", port, replicas=3)), check=True)
        after = {r["id"]: (r["pid"], r["restarts"]) for r in node.replicas("web")}
        assert after == before, "a running replica was started again instead of adopted"
        assert "hello-" in get(port)

    log = agentd_log(node, since=log_from)
    assert "already exists" not in log
    assert "did not start" not in log
    node.ctl("down", "web", check=True)


@pytest.mark.usefixtures("down_everything")
def test_a_replica_that_failed_for_a_missing_image_heals_on_the_next_up(
    node: Node, tmp_path: Path
) -> None:
    """Observation 5: the image is missing, the user imports it and runs ``up -d`` with
    the same spec: the replica starts at once instead of waiting out its backoff
    (a minute here: longer than ``up -d`` is given)."""
    image = "zlayer/later:1"
    port = free_port()
    text = web(node, "later", port, replicas=1, image=image).read_text()
    spec = node.spec("later", text + "    restart_policy: {kind: always, delay: 60s}\n")
    failed = node.ctl("up", "-d", str(spec), "--timeout", "10")
    assert failed.returncode != 0
    assert image in failed.stderr
    wait_until(
        lambda: any(r["state"] == "failed" for r in node.replicas("later")),
        30,
        "the failed start",
    )

    layout = write_oci_layout(busybox_image(), tmp_path / "oci")
    node.ctl("image", "import", str(layout), "--name", image, check=True)
    node.ctl("up", "-d", str(spec), "--timeout", "30", check=True)
    assert "hello-" in get(port)
    node.ctl("down", "later", check=True)
    node.ctl("image", "rm", image, check=True)


@pytest.mark.usefixtures("down_everything")
def test_a_refused_route_fails_up_with_its_sentence(node: Node) -> None:
    """A port proxyd cannot listen on fails ``up -d`` with proxyd's sentence, not "running"."""
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = node.ctl("up", "-d", str(web(node, "taken", port)), "--timeout", "60")
        assert result.returncode != 0
        assert "refused" in result.stderr and str(port) in result.stderr
        events = node.ctl("events", "-d", "taken", check=True).stdout
        assert "refused the traffic of taken" in events
    finally:
        holder.close()
        node.ctl("down", "taken")


def _running(node: Node, name: str) -> dict[str, tuple[int, int]]:
    """Each service's (running, stopping) replicas, as schedd counts them."""
    return {s: (v["running"], v["stopping"]) for s, v in node.services(name).items()}


def _waited(stderr: str, name: str, last: str) -> None:
    """``stderr`` is the lines of a stop or scale that waited: how many replicas of
    ``name`` were left, each new count once and stamped, then ``last``."""
    lines = stderr.strip().splitlines()
    assert lines[-1] == last, stderr
    waiting = re.compile(rf"\d\d:\d\d:\d\d waiting for \d+ replicas? of {name} to stop")
    assert all(waiting.fullmatch(line) for line in lines[:-1]), stderr
    assert len(set(lines)) == len(lines), stderr


@pytest.mark.usefixtures("down_everything")
def test_stop_and_scale_down_end_by_job_and_zlayerctl_says_what_it_did(node: Node) -> None:
    """Stop and a scale-down are schedd jobs that end once the replicas have stopped;
    zlayerctl waits on them and says what it said when it polled."""
    port = free_port()
    node.ctl("up", "-d", str(web(node, "halt", port, replicas=3, host="halt.test")), check=True)

    async def by_job() -> tuple[JobInfo, dict[str, tuple[int, int]], JobInfo]:
        bus = open_bus(resolve_bus_address(node.paths))
        try:
            client = SchedulerClient(bus)
            scaled = await client.run_job(lambda: client.scale("halt", "web", 1))
            after_scale = _running(node, "halt")
            stopped = await client.run_job(lambda: client.stop("halt", "", 10.0, False))
            return scaled, after_scale, stopped
        finally:
            bus.close()

    scaled, after_scale, stopped = asyncio.run(asyncio.wait_for(by_job(), 120))
    assert scaled.kind == "scale" and scaled.target == "halt", scaled
    assert scaled.state == "done", scaled.error
    # The jobs ended with the replicas stopped, not before.
    assert [(i.name, i.done == i.total) for i in scaled.items] == [("halt", True)]
    assert after_scale == {"web": (1, 0)}
    assert stopped.kind == "stop" and stopped.state == "done", stopped.error
    assert [(i.name, i.done == i.total) for i in stopped.items] == [("halt", True)]
    assert _running(node, "halt") == {"web": (0, 0)}
    assert node.replicas("halt") == []

    # zlayerctl: a scale-up ends at once, a scale-down and a stop once the replicas end.
    up = node.ctl("scale", "web", "3", "-d", "halt", check=True)
    assert up.stderr.strip() == "scaled web of halt to 3", up.stderr
    wait_until(lambda: _running(node, "halt") == {"web": (3, 0)}, 60, "three replicas")
    down = node.ctl("scale", "web", "1", "-d", "halt", check=True)
    _waited(down.stderr, "halt", "scaled web of halt to 1")
    assert _running(node, "halt") == {"web": (1, 0)}
    stop = node.ctl("stop", "halt", "-s", "web", check=True)
    _waited(stop.stderr, "halt", "stopped web of halt")
    assert _running(node, "halt") == {"web": (0, 0)}
    # Nothing left to stop: the job ends at once, the lines are the same.
    again = node.ctl("stop", "halt", check=True)
    assert again.stderr.strip() == "stopped halt", again.stderr
    no_wait = node.ctl("stop", "halt", "--no-wait", check=True)
    assert no_wait.stderr.strip() == "stopping halt", no_wait.stderr
    node.ctl("down", "halt", check=True)


@pytest.mark.usefixtures("down_everything")
def test_job_trigger_wait_fails_when_the_run_cannot_start(node: Node) -> None:
    spec = node.spec(
        "jobs",
        """
        version: v1
        deployment: jobs
        services:
          once:
            rtype: job
            image: zlayer/not-here:1
            command: {entrypoint: ["true"]}
        """,
    )
    node.ctl("deploy", str(spec), check=True)
    result = node.ctl("job", "trigger", "once", "-d", "jobs", "--wait", timeout=180)
    assert result.returncode != 0
    assert "did not start" in result.stderr and "zlayer/not-here:1" in result.stderr
    node.ctl("down", "jobs", check=True)


def test_containers_no_replica_owns_are_removed_and_replaced(restarted_node: Node) -> None:
    """Garbage: agentd's records are lost while the daemons are stopped (a disk
    problem, a hand that cleaned up). At the next start the containers nothing
    owns are stopped and removed, saying so, and the replicas schedd wants run anew."""
    node = restarted_node
    port = free_port()
    node.ctl("up", "-d", str(web(node, "web", port, replicas=2)), check=True)
    old = {r["id"]: r["pid"] for r in node.replicas("web")}
    node.ctl("daemon", "stop", check=True)
    state = node.paths.daemon_state("agentd")
    for directory in ("replicas", "assignments"):
        for path in (state / directory).glob("*.json"):
            path.unlink()
    node.ctl("daemon", "run", "--detach", check=True)
    wait_until(lambda: node.ctl("status").returncode == 0, 60, "all six daemons to run")

    def replaced() -> bool:
        now = {r["id"]: r for r in node.replicas("web")}
        return set(now) == set(old) and all(
            r["state"] == "running" and r["health"] == "healthy" and r["pid"] != old[cid]
            for cid, r in now.items()
        )

    wait_until(replaced, 90, "the unowned containers to be replaced by new replicas")
    assert not any(alive(pid) for pid in old.values())
    log = agentd_log(node)
    for cid in old:
        assert f"removed container {cid}: no replica of this node owns it" in log
    assert "hello-" in get(port)
    node.ctl("down", "web", check=True)


FENCED = """
version: v1
deployment: {name}
services:
  slow:
    image: {image}
    command: {{entrypoint: ["sh", "-c"], args: ["trap '' TERM; sleep 1000"]}}
    stop_grace_period: 30s
    scale: {{mode: fixed, replicas: 1}}
  quick:
    image: {image}
    command: {{entrypoint: ["sleep", "1000"]}}
    scale: {{mode: fixed, replicas: 1}}
"""


def test_a_service_removal_waiting_out_its_grace_period_holds_up_no_other(node: Node) -> None:
    """A node cut off from its cluster removes each of its services through agentd
    at once (RemoveService each, as schedd's fence does): one whose replica takes its
    whole grace period to stop (it ignores SIGTERM) does not hold up
    the removal of the others. schedd is frozen meanwhile, as a fenced node's
    reconcile pass is, so nothing assigns them again under the test."""
    import signal

    from shared.clients import AgentClient
    from shared.wire.agent import ReplicaInfo

    name = "fenced"
    spec = node.spec(name, FENCED.format(name=name, image=IMAGE))

    async def remove() -> tuple[bool, list[ReplicaInfo]]:
        bus = open_bus(resolve_bus_address(node.paths))
        agent = AgentClient(bus)
        try:
            slow = asyncio.ensure_future(agent.remove_service(name, "slow", 6.0, False))
            await asyncio.sleep(0.5)  # its replica now waits out the 6 s
            await agent.remove_service(name, "quick", 0.0, True)
            quick_first = not slow.done()
            left = await agent.list_replicas(name)
            await slow
            return quick_first, left
        finally:
            bus.close()

    # The node is shared: the deployment goes whatever fails, from the `up` on.
    try:
        node.ctl("up", "-b", str(spec), check=True)
        wait_until(
            lambda: (
                sorted(r["service"] for r in node.replicas(name) if r["state"] == "running")
                == ["quick", "slow"]
            ),
            60,
            f"{name}'s replicas running",
        )
        schedd = node.daemon_pid("schedd")
        os.kill(schedd, signal.SIGSTOP)
        try:
            quick_first, left = asyncio.run(remove())
        finally:
            os.kill(schedd, signal.SIGCONT)
        assert quick_first, "quick's removal waited for slow's grace period"
        assert [r.service for r in left] == ["slow"]
        assert left[0].state == "stopping"
    finally:
        node.ctl("down", name)
        wait_until(lambda: not node.replicas(name), 60, f"{name}'s replicas gone")
