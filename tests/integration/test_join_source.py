"""A join's source address, as the answering node sees it, comes back to the joining
node (real peer servers on loopback): NAT between them shows as another address than
the one the node gave for itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cluster import jointoken
from shared.cluster.peer import join, peer_host
from tests.integration.test_cluster_peer import Cluster, run, serving


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_join_reply_names_the_address_the_join_came_from(tmp_path: Path, host: str) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster, host=host) as server:
            token, record = jointoken.make(host, server.join_port, cluster.authority.fingerprint)
            cluster.desk.records[record.secret_sha256] = record
            # the node says it is at 192.0.2.9; the join came from loopback
            joined = await join(jointoken.parse(token.text()), "node-b", ["192.0.2.9"])
            assert joined.source_address == host

    run(scenario)


def test_peer_host_of_grpc_peer_strings() -> None:
    assert peer_host("ipv4:10.0.0.7:41234") == "10.0.0.7"
    assert peer_host("ipv6:[fd00::1]:41234") == "fd00::1"
    assert peer_host("ipv6:%5Bfd00::1%5D:41234") == "fd00::1"
    assert peer_host("unix:/run/x.sock") == ""
    assert peer_host("") == ""
