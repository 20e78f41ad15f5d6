"""A deployment on one node, driven only through zlayerctl, checked as a user would.

One set of daemons (its own prefix, bridge and subnet) serves the module; each
test brings its deployment up and takes it down again, and the leak check
around every test proves ``down`` leaves no mount, link, netns or cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psutil
import pytest

from ctl.supervisor import find_executable
from shared.bus import NotFoundError, open_bus, resolve_bus_address
from shared.clients import SchedulerClient
from shared.wire import decode, encode
from shared.wire.jobs import JobInfo
from shared.wire.scheduler import Deployed, DeploymentStatus
from tests.e2e.node import Node, free_port, http_get, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


T = TypeVar("T")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.usefixtures("down_everything"),
]

WEB = """
version: v1
deployment: {name}
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - mkdir -p /www && echo hello-$(hostname) > /www/index.html &&
          exec httpd -f -p 8080 -h /www
    endpoints: [{{name: http, protocol: http, port: 8080}}]
    scale: {{mode: fixed, replicas: {replicas}}}
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""


def test_web_deployment_serves_heals_and_goes_away(node: Node) -> None:
    spec = node.spec("web", WEB.format(name="web", replicas=3))
    node.ctl("up", "-d", str(spec), "--timeout", "90", check=True)

    services = node.services("web")
    assert services["web"]["healthy"] == 3 and services["web"]["state"] == "running"
    replicas = node.replicas("web")
    assert len(replicas) == 3 and all(r["health"] == "healthy" for r in replicas)
    pages = {http_get(f"http://{r['address']}:8080/index.html").strip() for r in replicas}
    assert len(pages) == 3 and all(p.startswith("hello-") for p in pages)

    # Replicas reach each other by IP.
    other = replicas[1]["address"]
    reach = node.ctl(
        "exec",
        "web",
        "-d",
        "web",
        "--replica",
        "1",
        "--",
        "sh",
        "-c",
        f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc {other} 8080",
    )
    assert reach.returncode == 0 and "200 OK" in reach.stdout

    # A killed replica comes back.
    victim = replicas[0]
    os.kill(victim["pid"], signal.SIGKILL)

    def healed() -> bool:
        now = {r["id"]: r for r in node.replicas("web")}
        again = now.get(victim["id"])
        return bool(
            again
            and again["state"] == "running"
            and again["pid"] != victim["pid"]
            and again["restarts"] >= 1
            and again["health"] == "healthy"
        )

    wait_until(healed, 60, "the killed replica to run healthy again")

    # Logs of a replica are there.
    logs = node.ctl("logs", "web", "-d", "web", "--instance", "2", "-n", "5")
    assert logs.returncode == 0

    # agentd killed by PID and restarted: replicas keep running and serving.
    pids = {r["id"]: r["pid"] for r in node.replicas("web")}
    os.kill(node.daemon_pid("agentd"), signal.SIGKILL)
    wait_until(lambda: node.ctl("status").returncode == 0, 60, "agentd to be restarted")
    after = wait_until(lambda: node.replicas("web"), 30, "ps to answer")
    assert {r["id"]: r["pid"] for r in after} == pids
    for r in after:
        assert http_get(f"http://{r['address']}:8080/index.html").startswith("hello-")

    node.ctl("down", "web", check=True)
    assert node.replicas("web") == []
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_named_volume_keeps_data_across_down_and_up(node: Node) -> None:
    body = """
    version: v1
    deployment: vol
    services:
      keeper:
        image: zlayer/busybox:latest
        command:
          entrypoint: ["sh", "-c"]
          args: ["echo run >> /data/runs && exec sleep 1000"]
        storage:
          - {type: named, name: zle-keep, target: /data}
          - {type: tmpfs, target: /scratch}
        scale: {mode: fixed, replicas: 1}
    """
    spec = node.spec("vol", body)
    for expected in (1, 2):
        node.ctl("up", "-d", str(spec), check=True)
        out = node.ctl(
            "exec", "keeper", "-d", "vol", "--", "sh", "-c", "wc -l < /data/runs", check=True
        )
        assert out.stdout.strip() == str(expected)
        node.ctl("down", "vol", check=True)


def test_memory_limit_is_enforced(node: Node) -> None:
    body = """
    version: v1
    deployment: oom
    services:
      hog:
        image: zlayer/busybox:latest
        command:
          entrypoint: ["sh", "-c"]
          args: ["x=$(head -c 200000000 /dev/zero | tr '\\\\0' a); sleep 1000"]
        resources: {memory: 16Mi}
        restart_policy: {kind: "no"}
        scale: {mode: fixed, replicas: 1}
    """
    node.ctl("up", "-b", str(node.spec("oom", body)), check=True)
    hog = wait_until(
        lambda: next((r for r in node.replicas("oom") if r["exit_code"] is not None), None),
        60,
        "the hog to be killed",
    )
    assert hog["exit_code"] == 137 and hog["oom_killed"] is True
    assert "OOM" in node.ctl("ps", "--containers", "-d", "oom").stdout
    node.ctl("down", "oom", check=True)


def test_a_replicas_network_is_whole_at_its_first_instruction(node: Node) -> None:
    """agentd creates the container while overlayd is still making its network (veth,
    address, route) and starts it only once that is done: the command's first act
    finds its address and its default route. Six replicas at once queue their networks
    in overlayd behind each other, so a start that did not wait would come first. A
    net.* sysctl, set by crun at the create, waits for eth0 before it."""
    body = """
    version: v1
    deployment: firstnet
    services:
      probe:
        image: zlayer/busybox:latest
        command:
          entrypoint: ["sh", "-c"]
          args: ["ip -o -4 addr show dev eth0 && ip route | grep '^default via'"]
        restart_policy: {kind: "no"}
        scale: {mode: fixed, replicas: 6}
      tuned:
        image: zlayer/busybox:latest
        command:
          entrypoint: ["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]
        sysctls: {net.ipv4.conf.eth0.rp_filter: "2"}
        restart_policy: {kind: "no"}
        scale: {mode: fixed, replicas: 3}
    """
    node.ctl("up", "-b", str(node.spec("firstnet", body)), check=True)
    ended = wait_until(
        lambda: (
            lambda rs: rs if len(rs) == 9 and all(r["exit_code"] is not None for r in rs) else None
        )(node.replicas("firstnet")),
        60,
        "the nine replicas to end",
    )
    for replica in ended:
        service, instance = replica["service"], str(replica["instance"])
        logs = node.ctl("logs", service, "-d", "firstnet", "--instance", instance)
        # restarts: a start that failed (crun could not set the sysctl) was tried again
        assert (replica["exit_code"], replica["restarts"]) == (0, 0), (replica, logs.stdout)
        if service == "probe":
            assert f"inet {replica['address']}/" in logs.stdout, logs.stdout
        else:
            assert logs.stdout.strip() == "2", logs.stdout
    node.ctl("down", "firstnet", check=True)


def test_depends_order_and_jobs(node: Node) -> None:
    body = """
    version: v1
    deployment: order
    services:
      db:
        image: zlayer/busybox:latest
        command:
          entrypoint: ["sh", "-c"]
          args: ["sleep 2 && exec httpd -f -p 5432"]
        endpoints: [{name: pg, protocol: tcp, port: 5432}]
        health: {start_grace: 10s, interval: 500ms, timeout: 1s, check: {type: tcp}}
        scale: {mode: fixed, replicas: 1}
      app:
        image: zlayer/busybox:latest
        command: {entrypoint: ["sleep", "1000"]}
        depends: [{service: db, condition: healthy, timeout: 60s}]
        scale: {mode: fixed, replicas: 1}
      fail3:
        rtype: job
        image: zlayer/busybox:latest
        command: {entrypoint: ["sh", "-c", "echo working; exit 3"]}
      tick:
        rtype: cron
        schedule: "*/2 * * * * *"
        image: zlayer/busybox:latest
        command: {entrypoint: ["true"]}
    """
    node.ctl("up", "-d", str(node.spec("order", body)), "--timeout", "90", check=True)
    replicas = {r["service"]: r for r in node.replicas("order")}
    assert replicas["app"]["started_at"] > replicas["db"]["started_at"] + 1.5

    run = node.ctl("job", "trigger", "fail3", "-d", "order", "--wait")
    assert run.returncode == 3
    status = json.loads(
        node.ctl("job", "status", "fail3", "-d", "order", "--format", "json").stdout
    )
    assert status[0]["exit_code"] == 3 and status[0]["state"] == "failed"

    def cron_ran() -> bool:
        runs = json.loads(
            node.ctl("job", "status", "tick", "-d", "order", "--format", "json").stdout
        )
        return any(r["trigger"] == "schedule" and r["state"] == "succeeded" for r in runs)

    wait_until(cron_ran, 30, "the cron job to fire")
    assert "tick" in node.ctl("job", "cron", "ls", "-d", "order").stdout
    node.ctl("down", "order", check=True)


def test_clear_sentences_for_user_mistakes(node: Node) -> None:
    missing = node.spec(
        "missing",
        """
    version: v1
    deployment: missing
    services:
      ghost:
        image: registry.invalid/nope/never:1
        scale: {mode: fixed, replicas: 1}
    """,
    )
    result = node.ctl("up", "-d", str(missing), "--timeout", "60")
    assert result.returncode == 1
    assert "cannot pull registry.invalid/nope/never:1" in result.stderr
    assert "import it with `zlayerctl image import PATH`" in result.stderr
    node.ctl("down", "missing", check=True)

    bad = node.spec(
        "bad",
        """
    version: v1
    deployment: bad
    services:
      web:
        image: zlayer/busybox:latest
        ports: [80]
    """,
    )
    result = node.ctl("up", str(bad))
    assert result.returncode == 1
    assert "endpoints" in result.stderr and ":7:" in result.stderr

    # What this node would not honour is refused before anything runs, with the fix;
    # what has no effect on one node is a warning, and the deployment goes ahead.
    shared_pid = node.spec(
        "sharedpid",
        """
    version: v1
    deployment: sharedpid
    services:
      web:
        image: zlayer/busybox:latest
        command: {entrypoint: [sleep, "600"]}
        pid_mode: container:db
    """,
    )
    result = node.ctl("up", "-b", str(shared_pid))
    assert result.returncode == 1
    assert "pid_mode 'container:db' is not supported; use private" in result.stderr
    assert "sharedpid" not in node.ctl("ps", "--format", "json", check=True).stdout
    placed = node.spec(
        "placed",
        """
    version: v1
    deployment: placed
    services:
      web:
        image: zlayer/busybox:latest
        command: {entrypoint: [sleep, "600"]}
        scale: {mode: fixed, replicas: 1}
        node_selector: {labels: {zone: a}}
        init_container: true
        pid_mode: host
    """,
    )
    result = node.ctl("up", "-d", str(placed), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: {placed}:9:5: service web: node_selector places replicas across a cluster"
        in result.stderr
    )
    events = node.ctl("events", "-d", "placed", check=True).stdout
    assert "node_selector places replicas across a cluster" in events
    node.ctl("down", "placed", check=True)

    # A tcp port belongs to one deployment; so does an http route (port, host and path).
    port, web_port = free_port(), free_port()
    public_http = f"port: {web_port}, target_port: 8080, expose: public}}"
    public_tcp = f"{public_http}, {{name: raw, protocol: tcp, port: {port}, "
    public_tcp += "target_port: 8080, expose: public}"
    first = node.spec(
        "first", WEB.format(name="first", replicas=1).replace("port: 8080}", public_tcp)
    )
    second = node.spec(
        "second",
        WEB.format(name="second", replicas=1)
        .replace("port: 8080}", f"port: 8080}}, {{name: raw, protocol: tcp, port: {port}}}")
        .replace("protocol: tcp, port", "protocol: tcp, expose: public, port"),
    )
    node.ctl("up", "-b", str(first), check=True)
    clash = node.ctl("up", "-b", str(second))
    assert clash.returncode == 1
    assert f"wants public port {port}/tcp" in clash.stderr
    assert "deployment first already uses; pick another port" in clash.stderr
    third = node.spec(
        "third",
        WEB.format(name="third", replicas=1).replace("port: 8080}", public_http),
    )
    route = node.ctl("up", "-b", str(third))
    assert route.returncode == 1
    assert f"wants public route http://*:{web_port}/" in route.stderr
    assert "give it another host or path" in route.stderr
    node.ctl("down", "first", check=True)


def on_bus(node: Node, body: Callable[[SchedulerClient], Awaitable[T]]) -> T:
    """``body`` with a SchedulerClient on the node's bus."""

    async def run() -> T:
        bus = open_bus(resolve_bus_address(node.paths))
        try:
            return await asyncio.wait_for(body(SchedulerClient(bus)), 120)
        finally:
            bus.close()

    return asyncio.run(run())


def deploy_job(
    client: SchedulerClient, text: str, seen: list[JobInfo]
) -> Awaitable[tuple[Deployed, JobInfo]]:
    """Deploy ``text`` and wait for its job's JobRemoved (``seen`` gets its progress)."""
    deployed: list[Deployed] = []

    async def start() -> int:
        deployed.append(await client.deploy(text, "spec.zlayer.yml", {}))
        return deployed[0].job

    async def run() -> tuple[Deployed, JobInfo]:
        info = await client.run_job(start, lambda job: seen.append(decode_copy(job)))
        return deployed[0], info

    return run()


def decode_copy(info: JobInfo) -> JobInfo:
    return decode(encode(info), JobInfo)


def test_deploy_and_down_are_jobs_that_end_by_signal(node: Node) -> None:
    text = WEB.format(name="jobs", replicas=2)

    async def body(client: SchedulerClient) -> None:
        seen: list[JobInfo] = []
        deployed, info = await deploy_job(client, text, seen)
        assert deployed.status.name == "jobs" and deployed.job == info.id
        assert info.kind == "deploy" and info.target == "jobs"
        assert info.state == "done", info.error
        final = decode(info.result, DeploymentStatus)
        assert final.state == "running" and final.revision == deployed.status.revision
        assert [(s.name, s.healthy, s.desired) for s in final.services] == [("web", 2, 2)]
        assert any(i.name == "web" and i.total == 2 for job in seen for i in job.items)
        assert [(i.name, i.done, i.total, i.state) for i in info.items] == [
            ("web", 2, 2, "running")
        ]
        # A cancelled wait leaves the deployment as it is.
        again = await client.deploy(text, "spec.zlayer.yml", {})
        with contextlib.suppress(NotFoundError):  # it may have ended already: all runs
            await client.cancel_job(again.job)
        assert (await client.get_deployment("jobs")).revision == again.status.revision

        removed = await client.run_job(lambda: client.down("jobs"))
        assert removed.kind == "down" and removed.state == "done", removed.error
        assert removed.items and removed.items[0].name == "jobs"
        try:
            await client.get_deployment("jobs")
        except NotFoundError:
            pass
        else:
            raise AssertionError("the deployment is still there after its down job ended")
        assert (await client.get_job(again.job)).state in ("cancelled", "done")

    on_bus(node, body)
    assert node.replicas("jobs") == []


def test_a_deploy_whose_command_cannot_run_fails_its_job_with_the_reason(node: Node) -> None:
    text = """
version: v1
deployment: broken
services:
  main:
    image: zlayer/busybox:latest
    command: {entrypoint: ["/no/such/command"]}
    scale: {mode: fixed, replicas: 1}
"""

    async def body(client: SchedulerClient) -> JobInfo:
        deployed, info = await deploy_job(client, text, [])
        assert info.id == deployed.job
        return info

    info = on_bus(node, body)
    assert info.state == "failed"
    assert info.error.startswith("broken failed: main: "), info.error
    # zlayerctl up -d says the same sentence.
    spec = node.spec("broken", text)
    result = node.ctl("up", "-d", str(spec), "--timeout", "60")
    assert result.returncode == 1
    assert "error: broken failed: main: " in result.stderr
    node.ctl("down", "broken", check=True)


SLOW = """
version: v1
deployment: slow
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - sleep 15 && mkdir -p /www && echo hello > /www/index.html &&
          exec httpd -f -p 8080 -h /www
    endpoints: [{name: http, protocol: http, port: 8080}]
    scale: {mode: fixed, replicas: 1}
    health:
      start_grace: 60s
      interval: 500ms
      timeout: 1s
      retries: 1
      check: {type: http, url: /index.html}
  stubborn:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["trap '' TERM; while :; do sleep 1; done"]
    stop_grace_period: 6s
    scale: {mode: fixed, replicas: 1}
"""


def ctl_in_background(node: Node, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [find_executable("zlayerctl"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node.env,
        cwd=node.workdir,
    )


def kill_schedd_and_finish(
    node: Node, waiting: subprocess.Popen[str], times: int = 1
) -> tuple[int, str]:
    """SIGKILL schedd ``times`` times (each time it is back) while ``waiting`` still waits
    on its job; then ``waiting``'s exit code and stderr."""
    for _ in range(times):
        assert waiting.poll() is None, waiting.communicate()
        pid = wait_until(lambda: node.daemon_pid("schedd"), 60, "schedd to be back")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda old=pid: node.daemon_pid("schedd") != old, 60, "schedd to go")
    try:
        _, err = waiting.communicate(timeout=150)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert "Traceback" not in err, err
    return waiting.returncode, err


def test_up_and_down_wait_on_when_schedd_restarts_meanwhile(node: Node) -> None:
    """up -d and down wait on when schedd restarts meanwhile (and so forgets their jobs)."""
    try:
        spec = node.spec("slow", SLOW)
        up = ctl_in_background(node, "up", "-d", str(spec), "--timeout", "120")

        def deployed_not_healthy() -> bool:
            assert up.poll() is None, up.communicate()
            listed = node.ctl("ps", "-d", "slow", "--format", "json")
            if listed.returncode != 0 or "slow" not in listed.stdout:
                return False
            web = next(
                s for d in json.loads(listed.stdout) for s in d["services"] if s["name"] == "web"
            )
            assert web["healthy"] == 0, "web became healthy before schedd was killed"
            return True

        wait_until(deployed_not_healthy, 60, "the slow deployment to be created")
        # A crash loop: the supervisor's backoff grows, so by the third restart schedd
        # stays away from the bus longer than the client waits between its questions.
        code, err = kill_schedd_and_finish(node, up, times=3)
        assert code == 0, err
        assert "slow is running" in err
        services = node.services("slow")
        assert services["web"]["state"] == "running" and services["web"]["healthy"] == 1

        down = ctl_in_background(node, "down", "slow", "--timeout", "120")

        def removing() -> bool:
            assert down.poll() is None, down.communicate()
            listed = json.loads(node.ctl("ps", "-d", "slow", "--format", "json", check=True).stdout)
            return any(d["name"] == "slow" and d["state"] == "removing" for d in listed)

        wait_until(removing, 60, "down to start stopping the replicas")
        code, err = kill_schedd_and_finish(node, down)
        assert code == 0, err
        assert "slow removed" in err
        assert node.replicas("slow") == []
        listed = json.loads(node.ctl("ps", "--format", "json", check=True).stdout)
        assert all(d["name"] != "slow" for d in listed)
    finally:  # a failure above may leave schedd restarting: down once it answers
        wait_until(lambda: node.ctl("ps").returncode == 0, 60, "schedd to answer")
        node.ctl("down", "slow")
