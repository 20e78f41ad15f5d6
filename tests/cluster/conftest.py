"""Fixtures of the cluster tests: a leak check around each, one cluster per module,
and one routed cluster with a node behind NAT that several modules share.

A three-node cluster costs about 12 to 16 s to bring up (its nodes start at
once: most of it is the daemons' start on two cores), 1 s to take down, and
about 185 MB of memory per node (the proportional set size of its supervisor,
bus, six daemons and etcd member): a module shares one, and a test that breaks
a node puts it back before it ends. Forming it (node init and joins, the mesh
coming up on every node) costs as much again: the modules that leave a cluster
as they found it share :func:`meshed_cluster`, and run one after the other at the
end of this directory, so it is up only while they run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import CLUSTERS, Cluster, form, listed_nodes
from tests.conftest import _snapshot

MESH_KEEPALIVE = 2  # seconds: the NAT'd node's mapping stays open within a test
MESH_SETTLE = 60.0


@pytest.fixture(autouse=True)
def _cluster_leak_check() -> Iterator[None]:
    """The host's leak check, reading only what a cluster of this process owns: the
    tests run beside others on the same machine, whose links and namespaces come
    and go meanwhile. Everything a node makes is named after its cluster's tag or
    its replicas, so nothing of ours escapes the filter."""
    before = _snapshot()
    yield
    after = _snapshot()
    leaks = {
        kind: sorted(item for item in after[kind] - before.get(kind, set()) if _ours(item))
        for kind in after
    }
    leaks = {kind: items for kind, items in leaks.items() if items}
    assert not leaks, f"the test left these behind: {leaks}"


def _ours(item: str) -> bool:
    return any(cluster.owns(item) for cluster in CLUSTERS)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("a cluster of network namespaces needs root")
    with Cluster(3) as started:
        yield started
    left = started.leftovers()
    assert not left, f"the cluster left these behind: {left}"


SHARED = "meshed_cluster"


@pytest.fixture(scope="package")
def meshed_cluster() -> Iterator[Cluster]:
    """Three nodes joined only through a router namespace (no shared LAN), n3 behind a
    NAT namespace in front of it (a private address no other node has a route to: the
    host reaches n1 and n2, not n3), made one cluster by ``node init`` on n1 and ``node
    join`` on the others, so the WireGuard mesh is on everywhere (keepalive 2 s) and
    carries all replica traffic between nodes. n1 and n2 are the etcd members; n3,
    its join seen coming from the NAT's address, is an etcd client only.

    Shared by every module that uses it (they run last, one after the other). A test
    on it must leave it as it found it: remove each deployment it made, even when it
    fails, and wait until its replicas are gone from every node
    (:func:`tests.cluster.harness.remove_deployment`); give its deployments names no
    other module uses (``node.deployment_name("<module's word>")``); leave every node
    running (one it kills is restarted and listed ready again), undrained and without
    labels it added; and remove anything it put in the router or the NAT namespace.
    Killing n1 or n2 leaves etcd without a quorum: only n3 may die.
    """
    if os.geteuid() != 0:
        pytest.skip("a cluster of network namespaces needs root")
    if shutil.which("wireguard-go") is None:
        pytest.skip("wireguard-go is not installed (apt-get install wireguard-go)")
    with Cluster(
        3, etcd=False, topology="routed", nat=[2], mesh_keepalive=MESH_KEEPALIVE
    ) as started:
        form(started)
        n1 = started[0]
        deadline = time.monotonic() + MESH_SETTLE
        while True:  # every node's record carries its key (the mesh is on everywhere)
            out = n1.run("node", "ls", "--format", "json", check=True).stdout
            records = json.loads(out)["nodes"]
            if len(records) == 3 and all(r["wireguard_key"] for r in records):
                break
            assert time.monotonic() < deadline, f"not every node has a mesh key: {records}"
            time.sleep(0.5)
        yield started
        # As found: a test that did not clean up shows here, by name.
        listed = listed_nodes(n1)
        assert all(node.alive for node in started), "a test left a node of the cluster dead"
        assert all(listed.get(node.name) == "ready" for node in started), listed
        out = n1.run("ps", "--format", "json", check=True).stdout
        assert json.loads(out) == [], f"a test left deployments behind: {out}"
    left = started.leftovers()
    assert not left, f"the cluster left these behind: {left}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules on the shared cluster run after the other cluster tests, one after
    the other, so it is up (three nodes' memory and idle daemons) only while they run."""
    shared_modules = {
        item.module.__name__
        for item in items
        if SHARED in getattr(item, "fixturenames", ()) and getattr(item, "module", None)
    }
    if not shared_modules:
        return

    def on_shared(item: pytest.Item) -> bool:
        module = getattr(item, "module", None)
        return module is not None and module.__name__ in shared_modules

    mine = [item for item in items if item.path.parent == _HERE]
    if not mine:
        return
    first = items.index(mine[0])
    ordered = [item for item in mine if not on_shared(item)] + [i for i in mine if on_shared(i)]
    rest = [item for item in items if item.path.parent != _HERE]
    items[:] = rest[:first] + ordered + rest[first:]


_HERE = Path(__file__).resolve().parent
