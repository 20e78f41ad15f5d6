"""Traffic on one node, as a user meets it: service DNS, proxyd, the kernel L4 path,
rollouts under load, rollback, and adaptive scaling.

The daemons run under `zlayerctl daemon run`; the public http endpoint is on a
free port (``node.http_port``), where proxyd listens for it; every request here
is a real one, from this test process or from inside a replica.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.node import Node, free_port, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.usefixtures("down_everything"),
]

SHOP = """
version: v1
deployment: shop
services:
  web:
    image: zlayer/busybox:latest
    env: {{VERSION: "{version}"}}
    command:
      entrypoint: ["sh", "-c"]
      args:
        - {script}
    endpoints:
      - {{name: http, protocol: http, port: {http_port}, target_port: 8080, expose: public}}
      - {{name: raw, protocol: tcp, port: {tcp_port}, target_port: 8080, expose: public}}
    scale: {{mode: fixed, replicas: {replicas}}}
    health:
      start_grace: 1s
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /ok}}
"""

SERVE = (
    "mkdir -p /www && echo v$VERSION-$(hostname) > /www/index.html && touch /www/ok && "
    "exec httpd -f -p 8080 -h /www"
)


def shop(node: Node, version: str, replicas: int, tcp_port: int, script: str = SERVE) -> Path:
    return node.spec(
        "shop",
        SHOP.format(
            version=version,
            replicas=replicas,
            tcp_port=tcp_port,
            http_port=node.http_port,
            script=script,
        ),
    )


def get(port: int, path: str = "/index.html") -> tuple[int, str]:
    """One request on a new connection, as most clients make them."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode().strip()
    finally:
        conn.close()


def bodies(port: int, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, body = get(port)
        seen[body if status == 200 else f"status {status}"] += 1
    return seen


def spread(port: int, count: int, replicas: int) -> Counter[str] | None:
    """The bodies of ``count`` requests, once they come from ``replicas`` replicas."""
    try:
        seen = bodies(port, count)
    except OSError:
        return None  # not routed yet
    return seen if len(seen) == replicas else None


def resolve_inside(node: Node, name: str) -> set[str]:
    """The addresses a replica's own resolver gives for ``name``."""
    out = node.ctl("exec", "web", "-d", "shop", "--", "nslookup", name)
    found = set(re.findall(r"Address(?: \d+)?:\s*(\d+\.\d+\.\d+\.\d+)", out.stdout))
    gateway = node.ctl("exec", "web", "-d", "shop", "--", "cat", "/etc/resolv.conf").stdout
    servers = set(re.findall(r"nameserver\s+(\S+)", gateway))
    return found - servers  # busybox prints the server's address too


def test_discovery_proxy_and_kernel_path_follow_health(node: Node) -> None:
    tcp_port = free_port()
    node.ctl("up", "-d", str(shop(node, "1", 3, tcp_port)), "--timeout", "90", check=True)
    replicas = {r["address"]: r for r in node.replicas("shop")}
    assert len(replicas) == 3

    # proxyd spreads requests over all three replicas.
    seen = wait_until(
        lambda: spread(node.http_port, 30, 3),
        20,
        "proxyd to route to all three replicas",
    )
    assert all(body.startswith("v1-") for body in seen), seen
    assert min(seen.values()) >= 5, f"round-robin should spread evenly: {seen}"

    # The kernel path answers on the published tcp port, from every replica.
    kernel = wait_until(
        lambda: spread(tcp_port, 30, 3),
        20,
        "the published tcp port to reach all three replicas",
    )
    assert all(body.startswith("v1-") for body in kernel), kernel

    # Replicas resolve each other by name.
    assert wait_until(
        lambda: resolve_inside(node, "web.service.local") == set(replicas),
        20,
        "web.service.local to answer the three replicas",
    )
    assert resolve_inside(node, "web-2.web.service.local") <= set(replicas)
    records = json.loads(node.ctl("dns", "-d", "shop", "--format", "json", check=True).stdout)
    by_name = {r["name"]: set(r["addresses"]) for r in records}
    assert by_name["web.service.local"] == set(replicas)
    routes = json.loads(node.ctl("routes", "-d", "shop", "--format", "json", check=True).stdout)
    http_route = next(r for r in routes if r["protocol"] == "http")
    assert {b.split(":")[0] for b in http_route["backends"]} == set(replicas)
    fetched = node.ctl(
        "exec", "web", "-d", "shop", "--", "wget", "-qO-", "http://web.service.local:8080/"
    )
    assert fetched.returncode == 0 and fetched.stdout.startswith("v1-"), fetched.stderr

    # A replica made unhealthy leaves the proxy, the kernel path and DNS.
    sick = next(r for r in node.replicas("shop") if r["instance"] == 2)
    direct = http.client.HTTPConnection(sick["address"], 8080, timeout=5)
    direct.request("GET", "/index.html")
    sick_body = direct.getresponse().read().decode().strip()
    direct.close()
    node.ctl("exec", "web", "-d", "shop", "--replica", "2", "--", "rm", "/www/ok", check=True)

    def out_of_rotation() -> bool:
        healthy = [r for r in node.replicas("shop") if r["health"] == "healthy"]
        return len(healthy) == 2 and resolve_inside(node, "web.service.local") == {
            r["address"] for r in healthy
        }

    wait_until(out_of_rotation, 20, "the unhealthy replica to leave DNS")
    time.sleep(1.0)  # one pass for proxyd and nft to take the new view
    after = bodies(node.http_port, 20)
    assert len(after) == 2, after
    kernel_after = bodies(tcp_port, 20)
    assert set(kernel_after) == set(after), (kernel_after, after)
    assert sick_body not in after and sick_body not in kernel_after
    node.ctl("down", "shop", check=True)


class RequestLoop(threading.Thread):
    """A steady client: one request after another through proxyd, each outcome kept."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.outcomes: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                status, body = get(self.port)
                self.outcomes.append(body.split("-", 1)[0] if status == 200 else f"HTTP {status}")
            except OSError as exc:
                self.outcomes.append(f"error {exc}")
            time.sleep(0.01)

    def stop(self) -> list[str]:
        self.stopping.set()
        self.join(10)
        return self.outcomes


def service(node: Node) -> dict[str, object]:
    return node.services("shop")["web"]


def test_rollout_under_load_loses_nothing_and_a_broken_one_keeps_the_old(node: Node) -> None:
    tcp_port = free_port()
    node.ctl("up", "-d", str(shop(node, "1", 2, tcp_port)), "--timeout", "90", check=True)
    wait_until(lambda: len(bodies(node.http_port, 10)) == 2, 20, "both replicas in rotation")

    loop = RequestLoop(node.http_port)
    loop.start()
    try:
        node.ctl("deploy", str(shop(node, "2", 2, tcp_port)), check=True)
        # schedd killed mid-rollout: proxyd keeps serving what it has, and the
        # restarted schedd carries the rollout on from its database.
        wait_until(lambda: service(node)["state"] == "updating", 30, "the rollout to start")
        os.kill(node.daemon_pid("schedd"), signal.SIGKILL)
        wait_until(lambda: node.ctl("status").returncode == 0, 60, "schedd to be restarted")
        wait_until(
            lambda: service(node)["state"] == "running" and service(node)["revision"] == 2,
            120,
            "the rollout to revision 2 to finish",
        )
        wait_until(lambda: loop.outcomes[-5:] == ["v2"] * 5, 20, "only v2 to answer")
    finally:
        outcomes = loop.stop()
    failures = [o for o in outcomes if o not in ("v1", "v2")]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed: {failures[:5]}"
    assert "v1" in outcomes and "v2" in outcomes
    # Old first, new after: traffic moved once, not back and forth.
    assert outcomes.index("v2") > outcomes.index("v1")
    rolled = node.ctl("events", "-d", "shop", "--format", "json", check=True)
    kinds = [e["kind"] for e in json.loads(rolled.stdout)]
    assert "rollout" in kinds and "rolled-out" in kinds

    # A broken revision never becomes healthy: the rollout stops, v2 keeps serving.
    broken = shop(node, "3", 2, tcp_port, script="echo starting; exit 3")
    node.ctl("deploy", str(broken), check=True)
    wait_until(
        lambda: service(node)["rollout"] == "failed",
        120,
        "the broken rollout to be stopped",
    )
    status = service(node)
    assert status["revision"] == 2
    assert "rollout of revision 3 stopped" in str(status["message"])
    assert "revision 2 keeps serving" in str(status["message"])
    assert all(b.startswith("v2-") for b in bodies(node.http_port, 10))

    # Rollback returns to the spec before the broken one; nothing restarts.
    before = {r["id"] for r in node.replicas("shop")}
    result = node.ctl("rollback", "shop", check=True)
    assert "revision 4" in result.stderr
    wait_until(lambda: service(node)["rollout"] == "", 30, "the rollback to settle")
    assert {r["id"] for r in node.replicas("shop")} <= before
    assert all(b.startswith("v2-") for b in bodies(node.http_port, 10))
    node.ctl("down", "shop", check=True)


def test_a_rollout_to_no_replicas_ends_and_stops_the_old_ones(node: Node) -> None:
    """A new spec of ``replicas: 0`` while the old revision serves (a deploy, or a rollback
    to such a revision): the old replicas leave and stop, and the rollout ends."""
    tcp_port = free_port()
    node.ctl("up", "-d", str(shop(node, "1", 2, tcp_port)), "--timeout", "90", check=True)
    try:
        node.ctl("deploy", str(shop(node, "2", 0, tcp_port)), check=True)
        wait_until(
            lambda: service(node)["rollout"] == "" and service(node)["revision"] == 2,
            30,
            "the rollout to revision 2, of no replicas, to end",
        )
        wait_until(lambda: not node.replicas("shop"), 30, "revision 1's replicas to stop")
        status = service(node)
        assert (status["desired"], status["running"], status["message"]) == (0, 0, ""), status
        rolled = node.ctl("events", "-d", "shop", "--format", "json", check=True)
        assert "rolled-out" in [e["kind"] for e in json.loads(rolled.stdout)]
    finally:
        node.ctl("down", "shop", check=True)


BURNER = """
version: v1
deployment: burn
services:
  burner:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["while :; do if [ -f /load/on ]; then :; else sleep 0.5; fi; done"]
    storage: [{{type: bind, source: "{load_dir}", target: /load}}]
    resources: {{cpu: 0.5}}
    scale: {{mode: adaptive, min: 1, max: 3, cooldown: 2s, targets: {{cpu: 50}}}}
    health: {{check: {{type: command, command: "true"}}, interval: 1s}}
"""


def test_load_scales_up_and_idleness_back_to_min(node: Node, tmp_path: Path) -> None:
    load_dir = tmp_path / "load"
    load_dir.mkdir()
    spec = node.spec("burn", BURNER.format(load_dir=load_dir))
    node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
    assert node.services("burn")["burner"]["desired"] == 1

    (load_dir / "on").touch()
    wait_until(
        lambda: node.services("burn")["burner"]["desired"] == 3,
        90,
        "a cpu burst to scale burner up to max",
    )
    (load_dir / "on").unlink()
    wait_until(
        lambda: node.services("burn")["burner"]["desired"] == 1,
        90,
        "idleness to scale burner back to min",
    )
    wait_until(lambda: len(node.replicas("burn")) == 1, 60, "the extra replicas to stop")
    events = json.loads(node.ctl("events", "-d", "burn", "--format", "json", check=True).stdout)
    reasons = [e["message"] for e in events if e["kind"] == "scaled"]
    assert any(re.search(r"scaled burner 1 -> [23]: cpu \d+% > target 50%", r) for r in reasons)
    assert any(re.search(r"scaled burner [23] -> 1: cpu", r) for r in reasons), reasons
    node.ctl("down", "burn", check=True)


PAGES = """
version: v1
deployment: pages
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["mkdir -p /www && echo page > /www/index.html && exec httpd -f -p 8080 -h /www"]
    endpoints:
      - {{name: http, protocol: http, port: {http_port}, target_port: 8080, expose: public,
          host: pages.test}}
    scale: {{mode: adaptive, min: 1, max: 3, cooldown: 2s, targets: {{rps: 20}}}}
    health: {{interval: 1s, timeout: 1s, retries: 1, check: {{type: http, url: /index.html}}}}
"""


def test_request_rate_through_proxyd_scales_up_and_back(node: Node) -> None:
    """proxyd's request counters reach schedd: a burst over the rps target adds
    replicas, and quiet brings the service back to min."""
    pages = node.spec("pages", PAGES.format(http_port=node.http_port))
    node.ctl("up", "-d", str(pages), "--timeout", "60", check=True)
    stop = threading.Event()
    answered: list[int] = []

    def burst() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=5)
            try:
                conn.request("GET", "/index.html", headers={"Host": "pages.test"})
                answered.append(conn.getresponse().status)
            except OSError:
                answered.append(0)
            finally:
                conn.close()
            time.sleep(0.005)

    loader = threading.Thread(target=burst, daemon=True)
    loader.start()
    try:
        wait_until(
            lambda: node.services("pages")["web"]["desired"] == 3,
            90,
            "the request burst to scale web to max",
        )
    finally:
        stop.set()
        loader.join(10)
    assert answered and answered.count(200) == len(answered), Counter(answered)
    wait_until(
        lambda: node.services("pages")["web"]["desired"] == 1,
        90,
        "quiet to scale web back to min",
    )
    events = json.loads(node.ctl("events", "-d", "pages", "--format", "json", check=True).stdout)
    reasons = [e["message"] for e in events if e["kind"] == "scaled"]
    assert any(re.search(r"scaled web 1 -> [23]: rps \d+ > target 20 x 1", r) for r in reasons), (
        reasons
    )
    assert any(re.search(r"scaled web [23] -> 1: rps", r) for r in reasons), reasons
    node.ctl("down", "pages", check=True)


def test_kill_9_of_proxyd_under_load_refuses_no_connection(node: Node) -> None:
    """proxyd's listening socket is kept by `zlayerctl daemon run`: while a new
    proxyd starts, connections wait in the kernel's queue instead of being refused."""
    tcp_port = free_port()
    node.ctl("up", "-d", str(shop(node, "1", 2, tcp_port)), "--timeout", "90", check=True)
    wait_until(lambda: len(bodies(node.http_port, 10)) == 2, 20, "both replicas in rotation")
    loop = RequestLoop(node.http_port)
    loop.start()
    try:
        wait_until(lambda: len(loop.outcomes) >= 20, 20, "requests through proxyd")
        killed = node.daemon_pid("proxyd")
        os.kill(killed, signal.SIGKILL)

        def new_pid() -> bool:
            try:
                return node.daemon_pid("proxyd") not in (killed, 0)
            except (StopIteration, ValueError, TypeError):
                return False  # not listed while it restarts

        wait_until(new_pid, 30, "a new proxyd")
        served = len(loop.outcomes)
        wait_until(lambda: len(loop.outcomes) >= served + 50, 60, "requests through the new one")
    finally:
        outcomes = loop.stop()
    refused = [o for o in outcomes if "refused" in o.lower()]
    assert not refused, Counter(outcomes)
    # Only a request the killed proxyd had in hand at that instant may fail.
    assert sum(1 for o in outcomes if o != "v1") <= 1, Counter(outcomes)
    node.ctl("down", "shop", check=True)
