"""gRPC between nodes on loopback, real servers: a join with a good token gets a certificate that
then works for mutual TLS; a bad secret, an expired token, another CA in the middle and a client
without a certificate are each refused with a sentence, and the secret never reaches an impostor."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import msgspec
import pytest

from shared.cluster import jointoken, pki
from shared.cluster.etcd import client
from shared.cluster.jointoken import JoinToken
from shared.cluster.peer import (
    PING,
    EtcdJoinDesk,
    JoinRefusedError,
    NodeTls,
    Peer,
    PeerError,
    PeerServer,
    call,
    join,
)
from shared.wire import decode
from shared.wire.cluster import KEYS, JoinRequest, JoinTokenRecord, PingReply, PingRequest
from tests.etcd_fixture import EtcdCluster, etcd1  # noqa: F401  (a fixture)

ETCD = ["https://127.0.0.1:2379"]


class Desk:
    """The cluster's side of joins, as a dict: what etcd would hold."""

    def __init__(self) -> None:
        self.records: dict[str, JoinTokenRecord] = {}
        self.asked: list[str] = []
        self.admitted: list[str] = []
        self.taken: set[str] = set()

    async def token(self, secret_sha256: str) -> JoinTokenRecord | None:
        self.asked.append(secret_sha256)
        return self.records.get(secret_sha256)

    async def admit(self, node_id: str, request: JoinRequest) -> list[str]:
        if node_id in self.taken:
            raise JoinRefusedError(
                f"a node named {node_id} is already in the cluster; join under another id"
            )
        self.admitted.append(node_id)
        return ETCD


class Cluster:
    def __init__(self, tmp_path: Path, name: str = "a") -> None:
        self.files = pki.ClusterFiles(tmp_path / name)
        self.authority = pki.init_cluster(self.files, f"node-{name}", ["127.0.0.1"])
        self.tls = NodeTls.of(self.files)
        self.desk = Desk()

    def token(self, server: PeerServer, ttl: float = 600) -> JoinToken:
        token, record = jointoken.make(
            "127.0.0.1", server.join_port, self.authority.fingerprint, ttl
        )
        self.desk.records[record.secret_sha256] = record
        return token


@asynccontextmanager
async def serving(
    node_id: str, tls: NodeTls, cluster: Cluster | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[PeerServer]:
    server = PeerServer(
        node_id,
        tls,
        authority=cluster.authority if cluster else None,
        desk=cluster.desk if cluster else None,
    )
    await server.start(host)
    try:
        yield server
    finally:
        await server.stop(None)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_a_node_joins_with_a_token_and_its_certificate_then_works_for_mutual_tls(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster) as server:
            text = cluster.token(server).text()
            joined = await join(jointoken.parse(text), "node-b", ["127.0.0.1"], name="b")
            assert joined.etcd_endpoints == ETCD
            assert pki.node_id_of(joined.certificate) == "node-b"
            assert pki.fingerprint(joined.ca_certificate) == cluster.authority.fingerprint
            assert cluster.desk.admitted == ["node-b"]
            files = pki.ClusterFiles(tmp_path / "b")
            await asyncio.to_thread(joined.write, files)
            assert {stat.S_IMODE(p.stat().st_mode) for p in files.directory.iterdir()} == {0o600}
            assert not files.ca_key.exists()  # the CA's key stays where it signs
            tls = await asyncio.to_thread(NodeTls.of, files)
            # the new certificate as a client of the first node, which it names
            async with Peer("127.0.0.1", server.peer_port, tls, expect_node="node-a") as peer:
                reply = await peer.ping()
            assert (reply.node, reply.peer) == ("node-a", "node-b")
            assert abs(reply.time - time.time()) < 60
            # ... and as a server the first node calls
            async with serving("node-b", tls) as second:
                async with Peer("127.0.0.1", second.peer_port, cluster.tls, "node-b") as peer:
                    reply = await peer.ping()
                assert (reply.node, reply.peer) == ("node-b", "node-a")
                # the server's certificate names node-b, not node-a: asked for node-a, refused
                async with Peer("127.0.0.1", second.peer_port, cluster.tls, "node-a") as peer:
                    with pytest.raises(PeerError, match=r"cannot reach the node at 127.0.0.1"):
                        await peer.ping(timeout=5)

    run(scenario)


def test_a_bad_secret_an_expired_token_and_a_taken_id_are_refused_with_a_sentence(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster) as server:
            good = cluster.token(server)
            forged = msgspec.structs.replace(
                good, secret=jointoken.make("127.0.0.1", 1, cluster.authority.fingerprint)[0].secret
            )
            with pytest.raises(PeerError) as caught:
                await join(forged, "node-b", ["127.0.0.1"])
            assert str(caught.value) == (
                "the join token is not one this cluster made (or it was revoked); make a new "
                "one with zlayerctl node join-token on a node of the cluster"
            )
            # the cluster's record decides the expiry, whatever the token says
            lapsed = cluster.token(server)
            key = jointoken.secret_sha256(lapsed.secret)
            record = cluster.desk.records[key]
            cluster.desk.records[key] = msgspec.structs.replace(record, expires_at=time.time() - 1)
            with pytest.raises(PeerError, match=r"^the join token expired at .* UTC; make a new"):
                await join(lapsed, "node-b", ["127.0.0.1"])
            cluster.desk.taken.add("node-b")
            with pytest.raises(PeerError, match=r"^a node named node-b is already in the cluster"):
                await join(good, "node-b", ["127.0.0.1"])
            assert cluster.desk.admitted == []
            # a token past its own expiry is refused before anything is sent
            with pytest.raises(jointoken.JoinTokenError, match="expired at"):
                jointoken.parse(cluster.token(server, ttl=0.001).text(), now=time.time() + 1)

    run(scenario)


def test_another_ca_in_the_middle_is_refused_and_never_sees_the_secret(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    impostor = Cluster(tmp_path, "m")

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster) as server:
            token = cluster.token(server)
        # the impostor now answers where the token points, with a CA of its own
        async with serving("node-m", impostor.tls, impostor) as middle:
            aimed = msgspec.structs.replace(token, port=middle.join_port)
            with pytest.raises(PeerError) as caught:
                await join(aimed, "node-b", ["127.0.0.1"])
            assert str(caught.value).startswith(
                f"the node at 127.0.0.1:{middle.join_port} does not show the CA whose "
                "fingerprint is in the token"
            )
        # ... or shows the cluster's CA certificate (it is public) beside its own certificate
        posing = NodeTls(cluster.tls.ca, impostor.tls.key, impostor.tls.cert)
        async with serving("node-m", posing, impostor) as middle:
            aimed = msgspec.structs.replace(token, port=middle.join_port)
            with pytest.raises(
                PeerError, match=r"shows the cluster's CA but no certificate of that"
            ):
                await join(aimed, "node-b", ["127.0.0.1"], timeout=5)
        assert impostor.desk.asked == []

    run(scenario)


def test_a_client_without_a_cluster_certificate_is_refused(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    stranger = Cluster(tmp_path, "s")

    async def attempt(port: int, credentials: Any) -> PingReply:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as chan:
            return await call(chan, PING, PingRequest(), PingReply, 5, f"port {port}")

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster) as server:
            only_ca = grpc.ssl_channel_credentials(root_certificates=cluster.tls.ca)
            with pytest.raises(PeerError, match=f"^cannot reach port {server.peer_port} over TLS"):
                await attempt(server.peer_port, only_ca)
            other_ca = grpc.ssl_channel_credentials(
                root_certificates=cluster.tls.ca,
                private_key=stranger.tls.key,
                certificate_chain=stranger.tls.cert,
            )
            with pytest.raises(PeerError, match=r"^cannot reach"):
                await attempt(server.peer_port, other_ca)
            # the join port takes anyone's TLS, and answers nothing but Join
            with pytest.raises(PeerError) as caught:
                await attempt(server.join_port, only_ca)
            assert str(caught.value) == (
                "this call needs a node certificate of the cluster: call the node's peer "
                "port with the certificate the node got when it joined"
            )
            # a certificate shown on the join port is not asked for, so it proves nothing
            with pytest.raises(PeerError, match="needs a node certificate"):
                await attempt(server.join_port, other_ca)

    run(scenario)


def test_a_node_that_does_not_sign_says_so(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        async with serving("node-a", cluster.tls) as server:
            token = cluster.token(server)
            with pytest.raises(PeerError, match=r"^node node-a does not sign joins; make the"):
                await join(token, "node-b", ["127.0.0.1"])

    run(scenario)


def test_a_node_joins_and_pings_over_ipv6(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        async with serving("node-a", cluster.tls, cluster, host="::1") as server:
            token, record = jointoken.make("::1", server.join_port, cluster.authority.fingerprint)
            cluster.desk.records[record.secret_sha256] = record
            joined = await join(jointoken.parse(token.text()), "node-b", ["::1"])
            async with Peer("::1", server.peer_port, joined.tls()) as peer:
                reply = await peer.ping()
            assert (reply.node, reply.peer) == ("node-a", "node-b")
            assert peer.where == f"the node at [::1]:{server.peer_port}"

    run(scenario)


def test_joins_answered_from_etcd_the_token_stored_as_its_hash_under_a_lease(
    tmp_path: Path,
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        async with client(etcd1.endpoints, timeout=10) as store:
            server = PeerServer(
                "node-a", cluster.tls, authority=cluster.authority, desk=EtcdJoinDesk(store)
            )
            await server.start("127.0.0.1")
            try:
                token, record = jointoken.make(
                    "127.0.0.1", server.join_port, cluster.authority.fingerprint, ttl=600
                )
                await jointoken.save(store, record)
                stored = await store.get(jointoken.record_key(record).encode())
                assert stored is not None and stored.lease != 0
                assert token.secret.encode() not in stored.value
                assert decode(stored.value, JoinTokenRecord) == record
                joined = await join(jointoken.parse(token.text()), "node-b", ["127.0.0.1"])
                assert joined.etcd_endpoints == etcd1.endpoints
                # an id the cluster already has is refused, the token still good
                await store.put((KEYS["nodes"] + "node-c").encode(), b"{}")
                with pytest.raises(PeerError, match=r"^a node with the id node-c is already in"):
                    await join(token, "node-c", ["127.0.0.1"])
                unknown, _ = jointoken.make(
                    "127.0.0.1", server.join_port, cluster.authority.fingerprint
                )
                with pytest.raises(PeerError, match=r"^the join token is not one this cluster"):
                    await join(unknown, "node-d", ["127.0.0.1"])
            finally:
                await server.stop(None)

    run(scenario)
