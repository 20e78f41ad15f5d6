"""Secrets that open on every node of a cluster: the cluster's secrets key crosses a real gRPC
join (never to an impostor, never for a bad token), and secrets sealed with it in real etcd
open through another node's Secrets."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from shared.cluster import jointoken, secretkey
from shared.cluster.peer import NodeTls, PeerError, PeerServer, join
from shared.cluster.pki import ClusterFiles
from tests.integration.test_cluster_peer import Cluster


@asynccontextmanager
async def serving(
    node_id: str, tls: NodeTls, cluster: Cluster, key: bytes | None
) -> AsyncIterator[PeerServer]:
    server = PeerServer(
        node_id, tls, authority=cluster.authority, desk=cluster.desk, secrets_key=key
    )
    await server.start("127.0.0.1")
    try:
        yield server
    finally:
        await server.stop(None)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_a_join_hands_over_the_clusters_secrets_key(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    key = secretkey.make(cluster.files)

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster, key) as server:
            token = jointoken.parse(cluster.token(server).text())
            joined = await join(token, "node-b", ["127.0.0.1"])
            assert joined.secrets_key == key
            assert key.hex() not in repr(joined) and repr(key) not in repr(joined)
            files = ClusterFiles(tmp_path / "b")
            await asyncio.to_thread(joined.write, files)
            assert secretkey.load(files) == key
            assert stat.S_IMODE(files.secrets_key.stat().st_mode) == 0o600

    run(scenario)


def test_no_key_for_a_bad_token_nor_through_an_impostor(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    key = secretkey.make(cluster.files)
    impostor = Cluster(tmp_path, "m")
    stolen = secretkey.make(impostor.files)

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster, key) as server:
            token = cluster.token(server)
            forged = msgspec.structs.replace(
                token,
                secret=jointoken.make("127.0.0.1", 1, cluster.authority.fingerprint)[0].secret,
            )
            with pytest.raises(PeerError, match=r"^the join token is not one this cluster made"):
                await join(forged, "node-b", ["127.0.0.1"])
        # another CA where the token points: refused before the token's secret leaves, so
        # the impostor cannot take it to the cluster for the key ...
        async with serving("node-m", impostor.tls, impostor, stolen) as middle:
            aimed = msgspec.structs.replace(token, port=middle.join_port)
            with pytest.raises(PeerError, match=r"does not show the CA whose fingerprint"):
                await join(aimed, "node-b", ["127.0.0.1"])
        # ... nor when it shows the cluster's (public) CA certificate beside its own
        posing = NodeTls(cluster.tls.ca, impostor.tls.key, impostor.tls.cert)
        async with serving("node-m", posing, impostor, stolen) as middle:
            aimed = msgspec.structs.replace(token, port=middle.join_port)
            with pytest.raises(PeerError, match=r"shows the cluster's CA but no certificate"):
                await join(aimed, "node-b", ["127.0.0.1"], timeout=5)
        assert impostor.desk.asked == []  # it never saw the token's secret
        assert cluster.desk.admitted == []

    run(scenario)


def test_a_node_without_a_key_hands_none_and_the_joiner_writes_none(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster, None) as server:
            joined = await join(cluster.token(server), "node-b", ["127.0.0.1"])
        assert joined.secrets_key is None
        files = ClusterFiles(tmp_path / "b")
        await asyncio.to_thread(joined.write, files)
        assert not files.secrets_key.exists()
        with pytest.raises(secretkey.SecretsKeyError, match=r"^this node does not have the"):
            secretkey.load(files)

    run(scenario)
