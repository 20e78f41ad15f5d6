"""A node of a four-node cluster dies outright: its replica moves to the three
survivors, the survivors' proxyd reaches only live replicas, and the node, booted
again, rejoins without taking back (or keeping a copy of) what it lost. The nodes
are joined only through a router, one of them (n4) behind NAT: its replica is
reached through the mesh, and its proxyd reaches the others'."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

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

ORPHAN_GONE_WITHIN = 15.0  # seconds: schedd's first view and the removal
FAILOVER_DEADLINE = 30.0  # generous: the goal is 10 s (lease 5 s, placement every 2 s)
SETTLE = 60.0


@pytest.fixture(scope="module")
def cluster(failover_cluster: Cluster) -> Cluster:
    """Four nodes joined only through a router (their replicas reach each other through
    the mesh), n4 behind NAT; n1 to n3 are the etcd voters."""
    return failover_cluster


# The same GETs as :func:`answers`, run inside a node (the host's Python).
ANSWERS = """
import sys, urllib.request
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
            print(reply.read().decode().strip())
    except OSError as exc:
        print(f"error: {exc}")
"""


def answers_on(node: Node, count: int) -> list[str]:
    """:func:`answers` of ``node``'s proxyd: from the host, or from inside ``node`` when
    it is behind NAT (the host does not reach it)."""
    url = f"http://{node.lan.ip}:8080/index.html"
    if not node.behind_nat:
        return answers(url, count)
    done = node.sh(sys.executable, "-c", ANSWERS, url, str(count), check=True)
    return done.stdout.splitlines()


def answers(url: str, count: int) -> list[str]:
    """The bodies of ``count`` GETs of ``url`` (a failed one counts as its error)."""
    found = []
    for _ in range(count):
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                found.append(reply.read().decode().strip())
        except OSError as exc:
            found.append(f"error: {exc}")
    return found


def started_since(node: Node, moment: float) -> set[str]:
    """The containers on ``node``'s runtime created after ``moment`` (epoch seconds)."""
    return {cid for cid, created in node.containers_created().items() if created > moment}


@contextlib.contextmanager
def starts_watched(node: Node, moment: float) -> Iterator[set[str]]:
    """The containers ``node`` creates after ``moment``, seen by looking every 0.1 s
    while the block runs (a container started and removed again lives a second)."""
    seen: set[str] = set()
    done = threading.Event()
    looks = 0  # listings made while the node's runtime directory was there
    failed: list[BaseException] = []

    def look() -> None:
        nonlocal looks
        try:
            while not done.is_set():
                # the runtime's root comes and goes with the node; a listing cut short
                with contextlib.suppress(OSError, ValueError):
                    there = (node.paths.run_dir / "agentd").is_dir()
                    seen.update(started_since(node, moment))
                    looks += there
                done.wait(0.1)
        except BaseException as exc:
            failed.append(exc)

    watcher = threading.Thread(target=look, name=f"starts-{node.name}", daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()
    if failed:
        raise failed[0]
    assert looks, f"{node.name}'s runtime was never listed while it ran"


def test_a_dead_nodes_replica_moves_to_the_survivors(cluster: Cluster) -> None:
    n1 = cluster[0]
    name = n1.deployment_name("failover")
    spec = n1.spec(name, SPREAD_WEB.format(name=name, replicas=4))
    killed: Node | None = None
    try:
        n1.run("up", "-d", str(spec), "--timeout", "120", check=True)
        before = wait_healthy(cluster.nodes, name, 4, time.monotonic() + SETTLE)
        assert sorted(len(found) for found in before.values()) == [1, 1, 1, 1], before
        # The leader runs one too (spread): killing it is the harder case, the
        # survivors must elect a new leader before anything is placed again.
        leader = listed_nodes(n1)["leader"]
        killed = next(node for node in cluster if node.name == leader)
        survivors = [node for node in cluster if node is not killed]
        lost = before[killed.name][0]["instance"]

        began, killed_at = time.monotonic(), time.time()
        killed.kill()
        killed_in = time.monotonic() - began
        after = wait_healthy(survivors, name, 4, began + FAILOVER_DEADLINE)
        failover = time.monotonic() - began
        print(
            f"failover: {leader} (leader) killed, its replica healthy on a survivor "
            f"{failover:.1f} s later (the kill itself took {killed_in:.1f} s)"
        )
        assert sorted(len(found) for found in after.values()) == [1, 1, 2], after
        live = {f"{name}-web-{r['instance']}" for found in after.values() for r in found}
        assert len(live) == 4, after
        # Through each survivor's proxyd (the NAT'd node's too): only the live replicas
        # answer, none fails.
        for node in survivors:
            seen = answers_on(node, 30)
            assert set(seen) == live, (node.name, seen)

        # Booted again, the node rejoins, and what it lost stays where it moved.
        began = time.monotonic()
        with starts_watched(killed, killed_at) as started_again:
            killed.restart()
            deadline = time.monotonic() + SETTLE
            while killed.name not in listed_nodes(survivors[0]):
                assert time.monotonic() < deadline, f"{killed.name} did not rejoin"
                time.sleep(0.5)
            print(f"rejoin: {killed.name} listed again {time.monotonic() - began:.1f} s after boot")
            # A few placement passes (every 2 s) with the node back: nothing moves to it.
            time.sleep(6)
        assert listed_nodes(killed)[killed.name] == "ready"
        assert healthy_replicas(killed, name) == [], f"{killed.name} runs {name} again"
        # Its agentd found the container of the replica that moved, ended, and kept
        # its assignment: it waited for schedd's view and never started it again.
        assert not started_again, f"{killed.name} started {started_again} again"
        # Nothing orphaned: no container of the old generation left on its runtime.
        deadline = time.monotonic() + ORPHAN_GONE_WITHIN
        while killed.containers():
            assert time.monotonic() < deadline, killed.containers()
            time.sleep(0.5)
        final = wait_healthy(survivors, name, 4, time.monotonic() + 10)
        assert {f"{name}-web-{r['instance']}" for f in final.values() for r in f} == live
        assert lost in {r["instance"] for found in final.values() for r in found}
    finally:
        if killed is not None and not killed.alive:
            killed.restart()
        remove_deployment(n1, name)
