"""Fixtures of the cluster tests: a leak check around each, one cluster per module,
and routed clusters with a node behind NAT that several modules share.

A three-node cluster costs about 12 to 16 s to bring up (its nodes start at
once: most of it is the daemons' start on two cores), 1 s to take down, and
about 185 MB of memory per node (the proportional set size of its supervisor,
bus, six daemons and etcd member): a module shares one, and a test that breaks
a node puts it back before it ends. Forming it (node init and joins, the mesh
coming up on every node) costs as much again: the modules that leave a cluster
as they found it share :func:`meshed_cluster`, those that kill or cut off a node
and put it back share :func:`failover_cluster`. Each shared cluster's modules run
one after the other at the end of this directory, and it is closed right after
the last of them, so it is up only while they run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import CLUSTERS, Cluster, form, listed_nodes
from tests.conftest import _snapshot

MESH_KEEPALIVE = 2  # seconds: the NAT'd node's mapping stays open within a test
MESH_SETTLE = 60.0
_HERE = Path(__file__).resolve().parent


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


# Clusters several modules share, by fixture name: made by the first module that asks,
# closed when the next test does not ask for it (its modules run one after the other).
_SHARED: dict[str, Cluster] = {}
_NEXT: list[pytest.Item | None] = [None]
SHARED_FIXTURES = ("meshed_cluster", "failover_cluster")


def _shared(
    request: pytest.FixtureRequest,
    name: str,
    make: Callable[[], Cluster],
    check: Callable[[Cluster], None],
) -> Iterator[Cluster]:
    """The shared cluster ``name`` (``make`` starts and forms it) for one module; after
    the last module of its run, ``check`` that it was left as found, and close it."""
    if os.geteuid() != 0:
        pytest.skip("a cluster of network namespaces needs root")
    if shutil.which("wireguard-go") is None:
        pytest.skip("wireguard-go is not installed (apt-get install wireguard-go)")
    cluster = _SHARED.get(name)
    if cluster is None:
        cluster = make()
        _SHARED[name] = cluster
    yield cluster
    following = _NEXT[0]
    stopping = request.session.shouldstop or request.session.shouldfail
    if following is not None and name in getattr(following, "fixturenames", ()) and not stopping:
        return
    del _SHARED[name]
    try:
        check(cluster)
    finally:
        cluster.close()
    left = cluster.leftovers()
    assert not left, f"the cluster left these behind: {left}"


def _formed(cluster: Cluster) -> Cluster:
    """``cluster`` started and formed (node init, joins), each node's mesh key published."""
    try:
        cluster.start()
        took = form(cluster)
        print(f"shared cluster: up in {cluster.up_seconds:.1f} s, formed in {took}")
        first = cluster[0]
        deadline = time.monotonic() + MESH_SETTLE
        while True:  # every node's record carries its key (the mesh is on everywhere)
            out = first.run("node", "ls", "--format", "json", check=True).stdout
            records = json.loads(out)["nodes"]
            if len(records) == len(cluster.nodes) and all(r["wireguard_key"] for r in records):
                return cluster
            assert time.monotonic() < deadline, f"not every node has a mesh key: {records}"
            time.sleep(0.5)
    except BaseException:
        cluster.close()
        raise


def _as_found(cluster: Cluster) -> None:
    """Every node running and listed ready (not draining), and no deployment left."""
    first = cluster[0]
    assert all(node.alive for node in cluster), "a test left a node of the cluster dead"
    listed = listed_nodes(first)
    assert all(listed.get(node.name) == "ready" for node in cluster), listed
    out = first.run("ps", "--format", "json", check=True).stdout
    assert json.loads(out) == [], f"a test left deployments behind: {out}"


@pytest.fixture(scope="module")
def meshed_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three nodes joined only through a router namespace (no shared LAN), n3 behind a
    NAT namespace in front of it (a private address no other node has a route to: the
    host reaches n1 and n2, not n3), made one cluster by ``node init`` on n1 and ``node
    join`` on the others, so the WireGuard mesh is on everywhere (keepalive 2 s) and
    carries all replica traffic between nodes. n1 and n2 are the etcd members; n3,
    its join seen coming from the NAT's address, is an etcd client only.

    Shared by every module that uses it (they run one after the other, at the end of
    this directory; it is closed after the last). A test on it must leave it as it
    found it: remove each deployment it made, even when it fails, and wait until its
    replicas are gone from every node (:func:`tests.cluster.harness.remove_deployment`);
    give its deployments names no other module uses (``node.deployment_name("<module's
    word>")``); leave every node running (one it kills is restarted and listed ready
    again), undrained and without labels it added; and remove anything it put in the
    router or the NAT namespace. Killing n1 or n2 leaves etcd without a quorum: only n3
    may die. After its last module the cluster is checked (every node running and
    ready, no deployment left) and closed.
    """
    yield from _shared(
        request,
        "meshed_cluster",
        lambda: _formed(
            Cluster(3, etcd=False, topology="routed", nat=[2], mesh_keepalive=MESH_KEEPALIVE)
        ),
        _as_found,
    )


@pytest.fixture(scope="module")
def failover_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Four nodes joined only through a router namespace, n4 behind NAT (an etcd client;
    n1 to n3 are the etcd voters, so one of them may die and etcd keeps its quorum),
    formed by node init and joins (the mesh on, keepalive 2 s), for the tests that kill
    a node or cut one off. Shared as :func:`meshed_cluster` is, on the same terms: a
    test puts back what it broke (boots a killed node again, plugs a cut one back in,
    waits until it is listed ready) and removes its deployments."""
    yield from _shared(
        request,
        "failover_cluster",
        lambda: _formed(
            Cluster(4, etcd=False, topology="routed", nat=[3], mesh_keepalive=MESH_KEEPALIVE)
        ),
        _as_found,
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Tells a shared cluster's fixture, as it is torn down, which test comes next."""
    _NEXT[0] = nextitem
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed cluster test's report carries the tails of its nodes' logs."""
    report = yield
    if report.failed and item.path.parent == _HERE:
        text = "\n".join(cluster.log_tails() for cluster in CLUSTERS).strip()
        if text:
            report.sections.append(("the nodes' logs", text))
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish() -> None:
    """A shared cluster a failed run left open is closed (its test already failed)."""
    while _SHARED:
        _, cluster = _SHARED.popitem()
        cluster.close()


def _shared_fixture(item: pytest.Item) -> str | None:
    names = getattr(item, "fixturenames", ())
    return next((name for name in SHARED_FIXTURES if name in names), None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules on a shared cluster run after the other cluster tests, those on each
    cluster one after the other, so each cluster is up only while its modules run."""
    mine = [item for item in items if item.path.parent == _HERE]
    if not mine:
        return
    group: dict[str, str] = {}  # module -> the shared fixture it uses
    for item in mine:
        used = _shared_fixture(item)
        if used is not None:
            group.setdefault(item.module.__name__ if item.module else "", used)

    def order(item: pytest.Item) -> tuple[int, bool]:
        # a module that stops whole nodes (RUNS_LAST) runs last on its cluster: the
        # others find its nodes as they were formed, never one started again
        module = item.module.__name__ if item.module else ""
        last = bool(getattr(item.module, "RUNS_LAST", False))
        return (1 + SHARED_FIXTURES.index(group[module]) if module in group else 0), last

    first = items.index(mine[0])
    ordered = sorted(mine, key=order)  # stable: each module's tests stay in order
    rest = [item for item in items if item.path.parent != _HERE]
    items[:] = rest[:first] + ordered + rest[first:]
