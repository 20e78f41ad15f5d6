"""Fixtures of the cluster tests: a leak check around each, and one cluster per module.

A three-node cluster costs about 12 to 16 s to bring up (its nodes start at
once: most of it is the daemons' start on two cores), 1 s to take down, and
about 185 MB of memory per node (the proportional set size of its supervisor,
bus, six daemons and etcd member): a module shares one, and a test that breaks
a node puts it back before it ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster.harness import CLUSTERS, Cluster
from tests.conftest import _snapshot


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
