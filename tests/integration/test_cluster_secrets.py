"""Secrets that open on every node of a cluster: the cluster's secrets key crosses a real gRPC
join (never to an impostor, never for a bad token), and secrets sealed with it in real etcd
open through another node's Secrets."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from daemons.schedd.etcdstore import EtcdStore, move_to_etcd
from daemons.schedd.secrets import (
    CLUSTER_KEY,
    SealingKey,
    Secrets,
    SecretUnreadableError,
    reseal,
    sealed_by,
)
from daemons.schedd.store import DesiredStore, Store
from shared.bus import UnavailableError
from shared.cluster import jointoken, secretkey
from shared.cluster.etcd import client
from shared.cluster.peer import NodeTls, PeerError, PeerServer, join
from shared.cluster.pki import ClusterFiles
from shared.cluster.secretkey import MISSING
from shared.nodekey import NodeKey
from shared.paths import Paths
from tests.etcd_fixture import EtcdCluster, etcd1  # noqa: F401  (a fixture)
from tests.integration.test_cluster_peer import Cluster

VALUE = "s3cr3t-VALUE-\u00e9-42"


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


# ------------------------------------------------------------ secrets in etcd


@contextmanager
def etcd_store(cluster: EtcdCluster) -> Iterator[EtcdStore]:
    store = EtcdStore(cluster.endpoints, timeout=10)
    try:
        yield store
    finally:
        store.close()


def node(store: DesiredStore, files: ClusterFiles | None) -> Secrets:
    """A node's Secrets over ``store``: a node key of its own, and with ``files`` the
    cluster's key from there."""
    own = os.urandom(32)
    if files is None:
        return Secrets(store, lambda: own)
    return Secrets(store, lambda: own, lambda: secretkey.load(files))


def raw_values(cluster: EtcdCluster) -> bytes:
    async def read() -> bytes:
        async with client(cluster.endpoints, timeout=10) as etcd:
            return b"".join(bytes(kv.value) for kv in await etcd.get_prefix(b"/zlayer/"))

    return asyncio.run(read())


def test_a_secret_set_on_one_node_opens_on_another(
    tmp_path: Path,
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    files_a, files_b = ClusterFiles(tmp_path / "a"), ClusterFiles(tmp_path / "b")
    secretkey.write(files_b, secretkey.make(files_a))  # as a join hands it over
    with etcd_store(etcd1) as store_a, etcd_store(etcd1) as store_b:
        a, b = node(store_a, files_a), node(store_b, files_b)
        a.set("db-password", "shop", VALUE)
        b.set("api-token", "", VALUE + "-b")
        assert b.open(b.require("db-password", "shop")) == VALUE
        assert a.open(a.require("api-token", "")) == VALUE + "-b"
        assert b.lookup("shop")("api-token") == VALUE + "-b"  # node-wide, from the other node
        stored = store_a.secret("db-password", "shop")
        assert stored is not None and sealed_by(stored)[0] == CLUSTER_KEY
    assert VALUE.encode() not in raw_values(etcd1)


def test_a_node_without_the_clusters_key_says_so_and_never_reads_garbage(
    tmp_path: Path,
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    files = ClusterFiles(tmp_path / "a")
    secretkey.make(files)
    keyless = ClusterFiles(tmp_path / "keyless")
    other_cluster = ClusterFiles(tmp_path / "other")
    secretkey.make(other_cluster)
    with etcd_store(etcd1) as store:
        node(store, files).set("db-password", "shop", VALUE)
        secret = store.secret("db-password", "shop")
        assert secret is not None
        for reader in (node(store, keyless), node(store, None)):  # in a cluster, and lone
            with pytest.raises(SecretUnreadableError) as caught:
                reader.open(secret)
            assert str(caught.value) == MISSING
        with pytest.raises(UnavailableError) as refused:
            node(store, keyless).set("other", "", VALUE)
        assert str(refused.value) == MISSING
        assert store.secret("other", "") is None
        with pytest.raises(SecretUnreadableError) as caught:
            node(store, other_cluster).open(secret)
        assert str(caught.value) == (
            "the secret db-password of deployment shop does not open with the cluster's "
            "secrets key (the key changed, or the row was altered); set it again with "
            "`zlayerctl secret set`"
        )
        assert VALUE not in str(caught.value)


def test_reseal_at_init_keeps_every_value_version_and_time(
    tmp_path: Path,
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    node_key = NodeKey.load(Paths(tmp_path / "prefix"), environ={}).secrets_key()
    lone = Store(tmp_path / "state.db")
    try:
        secrets = Secrets(lone, lambda: node_key)
        values = {(f"s{i}", dep): f"{VALUE}-{i}-{dep}" for i in range(5) for dep in ("", "shop")}
        for (name, dep), value in values.items():
            secrets.set(name, dep, value)
        secrets.set("s0", "", values[("s0", "")])  # version 2
        # a value sealed before key ids: a bare 12-byte nonce, the node key's
        legacy_nonce = os.urandom(12)
        sealed = AESGCM(node_key).encrypt(legacy_nonce, b"legacy", b"old\0")
        lone.put_secret("old", "", legacy_nonce, sealed)
        values[("old", "")] = "legacy"
        lone.put_secret("broken", "", b"\x01" + os.urandom(12), b"not sealed by any key")
        before = {(s.name, s.deployment): s for s in lone.secrets()}
        files = ClusterFiles(tmp_path / "cluster")
        cluster_key = secretkey.make(files)
        with etcd_store(etcd1) as store:
            move_to_etcd(lone, store)
            other = node(store, files)  # another node of the cluster
            with pytest.raises(SecretUnreadableError, match="does not open with this node's"):
                other.open(other.require("s1", ""))
            done = reseal(store, SealingKey.node(node_key), SealingKey.cluster(cluster_key))
            assert done == (len(values), ["node-wide secret broken"])
            after = {(s.name, s.deployment): s for s in store.secrets()}
            assert after.keys() == before.keys()
            for (name, dep), value in values.items():
                found = after[(name, dep)]
                assert other.open(found) == value
                assert sealed_by(found)[0] == CLUSTER_KEY
                old = before[(name, dep)]
                assert (found.version, found.created_at, found.updated_at) == (
                    old.version,
                    old.created_at,
                    old.updated_at,
                )
            assert after[("broken", "")] == before[("broken", "")]  # left as it was
            # run again (as after a cut-short init): nothing left to do
            again = reseal(store, SealingKey.node(node_key), SealingKey.cluster(cluster_key))
            assert again == (0, ["node-wide secret broken"])
        # the lone node's own copy is untouched: a failed init leaves it readable
        assert secrets.open(secrets.require("s1", "shop")) == values[("s1", "shop")]
    finally:
        lone.close()


def test_a_secret_set_alone_opens_on_a_node_that_joins_after_init(
    tmp_path: Path,
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    """The whole way, as node init and node join go: a lone node's secret, moved and
    resealed at init, opens on a node that joined over gRPC and got the key there."""
    node_key = os.urandom(32)
    lone = Store(tmp_path / "state.db")
    try:
        Secrets(lone, lambda: node_key).set("db-password", "shop", VALUE)
        cluster = Cluster(tmp_path)  # init: the CA and this node's certificate ...
        key = secretkey.make(cluster.files)  # ... and the secrets key
        with etcd_store(etcd1) as store:
            move_to_etcd(lone, store)
            reseal(store, SealingKey.node(node_key), SealingKey.cluster(key))

            async def joining() -> ClusterFiles:
                async with serving("node-a", cluster.tls, cluster, key) as server:
                    joined = await join(cluster.token(server), "node-b", ["127.0.0.1"])
                files = ClusterFiles(tmp_path / "b")
                await asyncio.to_thread(joined.write, files)
                return files

            files_b = asyncio.run(asyncio.wait_for(joining(), 60))
            with etcd_store(etcd1) as store_b:
                joined_node = node(store_b, files_b)
                assert joined_node.lookup("shop")("db-password") == VALUE
    finally:
        lone.close()
