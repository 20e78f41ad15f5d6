"""`node drain` on a three-node cluster: the drained node's replicas leave by rollout (their
new copies serve on the other nodes before the old ones stop), so a client sending
requests through another node's proxyd all the while sees none fail, even to a service
whose one replica runs on the drained node. `node undrain` puts it back in service.
On the shared cluster (``meshed_cluster``), n3 behind NAT."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from shared.bus import Scheduler1
from tests.cluster.harness import (
    SPREAD_WEB,
    Cluster,
    Node,
    healthy_replicas,
    listed_nodes,
    remove_deployment,
    wait_healthy,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 60.0
# SPREAD_WEB (a replica on each node) and one replica of another http service.
WEB_AND_SOLO = (
    SPREAD_WEB
    + """
  solo:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8081 -h /www
    endpoints: [{{name: http, protocol: http, port: 8081, expose: public}}]
    scale: {{mode: fixed, replicas: 1}}
    stop_grace_period: 1s
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""
)
DRAIN_DEADLINE = 60.0  # generous: new copies start, settle 2 s, old ones drain 2 s


@pytest.fixture(scope="module")
def cluster(meshed_cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster: three nodes joined only through a router (a drain's handover
    runs over the mesh), n3 behind NAT. Left as found: no node drained at the end."""
    yield meshed_cluster
    n1 = meshed_cluster[0]
    for node, state in listed_nodes(n1).items():
        if state == "draining":
            n1.run("node", "undrain", node_ids(n1)[node], check=True)


def node_ids(node: Node) -> dict[str, str]:
    """Each node's name to its id, as ``node`` lists them."""
    out = node.run("node", "ls", "--format", "json", check=True)
    return {record["name"]: record["id"] for record in json.loads(out.stdout)["nodes"]}


def replicas_on(node: Node, name: str) -> list[dict[str, Any]]:
    """Every replica of ``name`` that ``node`` itself runs, whatever its state."""
    out = node.run("ps", "--containers", "-d", name, "--format", "json", check=True)
    return [
        r
        for r in json.loads(out.stdout)
        if r["deployment"] == name and r["node"].rpartition("-")[0] == node.name
    ]


def healthy(nodes: list[Node], name: str) -> dict[str, list[tuple[str, int]]]:
    """Each node's healthy replicas of ``name`` as (service, instance)."""
    return {
        node.name: sorted((r["service"], r["instance"]) for r in healthy_replicas(node, name))
        for node in nodes
    }


class Requests(threading.Thread):
    """GETs of ``urls`` in turn until stopped; each failure with its time."""

    def __init__(self, *urls: str) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.sent = 0
        self.failed: list[tuple[float, str, str]] = []  # (monotonic time, url, error)
        self.bodies: set[str] = set()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            url = self.urls[self.sent % len(self.urls)]
            self.sent += 1
            try:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    self.bodies.add(reply.read().decode().strip())
            except OSError as exc:
                self.failed.append((time.monotonic(), url, str(exc)))
            time.sleep(0.02)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=30)


def test_drain_moves_every_replica_off_the_node_and_loses_no_request(cluster: Cluster) -> None:
    n1 = cluster[0]
    name = n1.deployment_name("drain")
    spec = n1.spec(name, WEB_AND_SOLO.format(name=name, replicas=3))
    client: Requests | None = None
    try:
        n1.run("up", "-d", str(spec), "--timeout", "120", check=True)
        wait_healthy(cluster.nodes, name, 4, time.monotonic() + SETTLE)
        before = healthy(cluster.nodes, name)
        webs = [len([r for r in found if r[0] == "web"]) for found in before.values()]
        assert webs == [1, 1, 1], before
        # The node running solo's one replica is drained; the requests go through
        # another node's proxyd, which also routes to the drained node's web replica.
        drained = next(node for node in cluster if ("solo", 1) in before[node.name])
        others = [node for node in cluster if node is not drained]
        entry = others[0]
        web = f"http://{entry.lan.ip}:8080/index.html"
        solo = f"http://{entry.lan.ip}:8081/index.html"
        client = Requests(web, solo)
        client.start()
        deadline = time.monotonic() + 10
        while len(client.bodies) < 3:
            assert time.monotonic() < deadline, f"{entry.name} does not reach all: {client.bodies}"
            time.sleep(0.1)

        began = time.monotonic()
        entry.run("node", "drain", node_ids(entry)[drained.name], check=True)
        deadline = began + DRAIN_DEADLINE
        both = 0.0  # when solo's new copy was seen healthy while the old one still ran
        while True:
            rows = healthy(others, name)
            left = replicas_on(drained, name)
            moved = any(("solo", 1) in found for found in rows.values())
            old = any(r["service"] == "solo" and r["state"] == "running" for r in left)
            if moved and old and not both:
                both = time.monotonic()
            if sum(len(found) for found in rows.values()) == 4 and not left:
                break
            assert time.monotonic() < deadline, f"{drained.name} still runs {left}: {rows}"
            time.sleep(0.2)
        print(f"drain: {drained.name}'s replicas left {time.monotonic() - began:.1f} s after")
        time.sleep(2)  # and a little after, while every proxyd settles
        client.stop()
        assert client.sent > 50, client.sent
        # Not one request failed, to either service: the spread one, and the one whose
        # only replica moved (each node's replicas have cgroups of their own, so the old
        # copy's removal leaves the new one alone, as on separate machines).
        for url in (web, solo):
            failed = [f for f in client.failed if f[1] == url]
            assert failed == [], f"{url}: {len(failed)} of {client.sent // 2}: {failed}"
        # The one replica's new copy served before the old one stopped.
        assert both, f"{drained.name}'s solo stopped before its new copy was healthy"

        everything = sorted(r for found in rows.values() for r in found)
        assert everything == [("solo", 1), ("web", 1), ("web", 2), ("web", 3)], rows
        assert sorted(len([r for r in f if r[0] == "web"]) for f in rows.values()) == [1, 2]
        assert listed_nodes(entry)[drained.name] == "draining"
        # It stays drained: a few placement passes later, it still runs nothing.
        time.sleep(4)
        assert replicas_on(drained, name) == []
    finally:
        if client is not None:
            client.stop()
        remove_deployment(n1, name)


@pytest.mark.skipif(
    not hasattr(Scheduler1, "undrain_node"), reason="schedd has no UndrainNode method yet"
)
def test_undrain_puts_the_node_back_in_service(cluster: Cluster) -> None:
    n1 = cluster[0]
    listed = listed_nodes(n1)
    drained = next((node for node in cluster if listed[node.name] == "draining"), None)
    if drained is None:  # run on its own
        drained = cluster[2]
        n1.run("node", "drain", node_ids(n1)[drained.name], check=True)
    entry = next(node for node in cluster if node is not drained)
    entry.run("node", "undrain", node_ids(entry)[drained.name], check=True)
    for node in cluster:
        deadline = time.monotonic() + 10
        while listed_nodes(node)[drained.name] != "ready":
            assert time.monotonic() < deadline, f"{node.name} does not list it ready"
            time.sleep(0.25)
    # New placements use it again: a spread service gets a replica on each node.
    name = n1.deployment_name("undrain")
    spec = n1.spec(name, SPREAD_WEB.format(name=name, replicas=3))
    try:
        n1.run("up", "-d", str(spec), "--timeout", "120", check=True)
        found = wait_healthy(cluster.nodes, name, 3, time.monotonic() + SETTLE)
        assert sorted(len(rows) for rows in found.values()) == [1, 1, 1], found
    finally:
        remove_deployment(n1, name)
