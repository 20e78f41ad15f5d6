"""The real-etcd fixture: members start healthy, survive a killed member, and go away."""

from __future__ import annotations

import asyncio
import os

import psutil

from shared.cluster.etcd import client, retrying
from tests.etcd_fixture import EtcdCluster, etcd3, etcd_cluster  # noqa: F401  (a fixture)


def test_three_members_healthy_and_a_killed_member_keeps_a_committed_key(
    etcd3: EtcdCluster,  # noqa: F811
) -> None:
    assert len(etcd3.endpoints) == 3

    async def put_then_kill_then_read() -> None:
        async with client(etcd3.endpoints, timeout=10) as c:
            await c.put(b"/zlayer/test/committed", b"yes")
        etcd3.kill(0)  # whichever it was, the other two are a quorum
        async with client(etcd3.endpoints[1:], timeout=10) as c:
            # If m0 led, the other two elect a leader first: calls fail until then.
            got = await retrying(lambda: c.get(b"/zlayer/test/committed"), 30)
            assert got is not None and got.value == b"yes"
            await retrying(lambda: c.put(b"/zlayer/test/later", b"written while m0 was down"), 30)

    asyncio.run(put_then_kill_then_read())
    # The killed member comes back on its data and catches up.
    etcd3.restart(0)

    async def read_from_the_restarted() -> None:
        async with client(etcd3.endpoints[:1], timeout=10) as c:
            for key, value in ((b"committed", b"yes"), (b"later", b"written while m0 was down")):
                got = await c.get(b"/zlayer/test/" + key)
                assert got is not None and got.value == value

    asyncio.run(read_from_the_restarted())


def test_the_members_are_killed_and_their_data_removed_at_the_end() -> None:
    with etcd_cluster(1) as cluster:
        pids = [p.pid for p in cluster.processes.values()]
        root = cluster.root
        assert all(psutil.pid_exists(pid) for pid in pids)
    assert not root.exists()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_tls_members_answer_a_client_with_a_certificate_only() -> None:
    with etcd_cluster(1, tls=True) as cluster:
        assert cluster.tls is not None and cluster.endpoints[0].startswith("https://")

        async def check() -> None:
            async with client(cluster.endpoints, cluster.tls, timeout=10) as c:
                await c.put(b"k", b"v")
                got = await c.get(b"k")
                assert got is not None and got.value == b"v"

        asyncio.run(check())
    assert os.path.exists(cluster.root) is False
