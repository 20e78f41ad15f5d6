"""The cluster's trust on real etcd and real peer servers: the CA key sealed in etcd lets a node
that never held ca.key sign joins; a node removed (its certificate revoked) or unknown to the
cluster is refused at another node's peer port, though its certificate still verifies; etcd
refuses a revoked certificate once the member's CRL names it, without a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc  # type: ignore[import-untyped]
import pytest
from cryptography import x509

from shared.cluster import jointoken, pki, trust
from shared.cluster.etcd import Client, TLSFiles, client
from shared.cluster.peer import (
    LOGS,
    EtcdJoinDesk,
    NodeTls,
    Peer,
    PeerError,
    PeerServer,
    join,
    renew,
)
from shared.wire import encode
from shared.wire.cluster import KEYS, NodeCapacity, NodeRecord
from tests.etcd_fixture import EtcdCluster, etcd1, etcd_cluster  # noqa: F401  (a fixture)

LOCAL = ["127.0.0.1"]


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 90))


def record(node: str) -> bytes:
    return encode(
        NodeRecord(
            id=node,
            name=node,
            address="127.0.0.1",
            peer_port=1,
            capacity=NodeCapacity(cpu=1, memory=1),
        )
    ).encode()


def node_files(tmp_path: Path, authority: pki.Authority, node: str) -> pki.ClusterFiles:
    """A node's files as a join leaves them: the CA certificate, its key and certificate."""
    files = pki.ClusterFiles(tmp_path / node)
    key, certificate = authority.issue(node, LOCAL)
    files.write_ca_certificate(authority.certificate)
    files.write_node(key, certificate)
    return files


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.05)


def test_a_node_without_ca_key_signs_joins_with_the_key_sealed_in_etcd(
    tmp_path: Path,
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    first = pki.ClusterFiles(tmp_path / "a")
    authority = pki.init_cluster(first, "node-a", LOCAL)
    secrets_key = secrets.token_bytes(32)

    async def scenario() -> None:
        async with client(etcd1.endpoints, timeout=10) as store:
            # the init node's ca.key goes into etcd once, sealed
            held = await trust.authority_of(store, first, secrets_key)
            assert held is not None and held.fingerprint == authority.fingerprint
            assert not await trust.store_authority(store, authority, secrets_key)
            stored = await store.get(KEYS["ca_key"].encode())
            assert stored is not None
            assert pki.key_pem(authority.key) not in stored.value
            # a node that joined holds ca.crt and the secrets key, never ca.key
            second = await asyncio.to_thread(node_files, tmp_path, authority, "node-b")
            assert not second.ca_key.exists()
            with pytest.raises(pki.PkiError, match=r"does not open with this node's secrets key"):
                await trust.authority_of(store, second, secrets.token_bytes(32))
            opened = await trust.authority_of(store, second, secrets_key)
            assert opened is not None and opened.fingerprint == authority.fingerprint
            server = PeerServer(
                "node-b",
                await asyncio.to_thread(NodeTls.of, second),
                authority=opened,
                desk=EtcdJoinDesk(store),
            )
            await server.start("127.0.0.1")
            try:
                # node-b's own token (its address and join port), a join through it
                token, saved = jointoken.make(
                    "127.0.0.1", server.join_port, opened.fingerprint, created_by="node-b"
                )
                await jointoken.save(store, saved)
                joined = await join(jointoken.parse(token.text()), "node-c", LOCAL)
                assert pki.issued_by(joined.certificate, authority.certificate)
                issued = await store.get_prefix(f"{KEYS['certificates']}node-c/".encode())
                assert [kv.key.decode().rsplit("/", 1)[1] for kv in issued] == [
                    pki.serial_hex(joined.certificate)
                ]
                # a removed node's id is never admitted again
                await trust.revoke(store, "node-d")
                with pytest.raises(PeerError, match=r"^node node-d was removed from the cluster"):
                    await join(token, "node-d", LOCAL)
            finally:
                await server.stop(None)

    run(scenario)


def test_a_removed_or_unknown_node_is_refused_at_the_peer_port(
    tmp_path: Path,
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    first = pki.ClusterFiles(tmp_path / "a")
    authority = pki.init_cluster(first, "node-a", LOCAL)
    third = node_files(tmp_path, authority, "node-c")
    stranger = node_files(tmp_path, authority, "node-x")  # signed, but no node of the cluster

    async def scenario() -> None:
        async with client(etcd1.endpoints, timeout=10) as store:
            await trust.record_issued(store, third.node_certificate())
            await store.put((KEYS["nodes"] + "node-c").encode(), record("node-c"))
            gate = trust.Trust(store, dict, first, authority)  # none seen live yet: etcd decides
            await gate.start()
            server = PeerServer("node-a", NodeTls.of(first), gate=gate.refusal)
            await server.start("127.0.0.1", join_port=None)
            tls_c = NodeTls.of(third)
            try:
                async with Peer("127.0.0.1", server.peer_port, tls_c, "node-a") as peer:
                    assert (await peer.ping()).peer == "node-c"
                async with Peer("127.0.0.1", server.peer_port, NodeTls.of(stranger)) as peer:
                    with pytest.raises(PeerError, match=r"^node node-x is not a node of this"):
                        await peer.ping()
                await trust.revoke(store, "node-c")  # what node rm node-c does
                await until(lambda: "node-c" in gate.revoked)
                async with Peer("127.0.0.1", server.peer_port, tls_c, "node-a") as peer:
                    with pytest.raises(
                        PeerError,
                        match=r"^node node-c was removed from the cluster and its certificate",
                    ):
                        await peer.ping()
                    # a stream (Logs) is refused before it starts, too
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        async for _ in peer.channel.unary_stream(LOGS)(b"{}", timeout=5):
                            pass
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # the CA's CRL names its certificate, for etcd's members
                serial = third.node_certificate().serial_number

                def listed() -> bool:
                    crl = x509.load_pem_x509_crl(first.crl.read_bytes())
                    assert crl.is_signature_valid(authority.key.public_key())
                    return crl.get_revoked_certificate_by_serial_number(serial) is not None

                await until(listed)
            finally:
                await server.stop(None)
                await gate.stop()

    run(scenario)


def tls_of(files: pki.ClusterFiles) -> TLSFiles:
    return TLSFiles(ca=files.ca_cert, cert=files.node_cert, key=files.node_key)


async def answers(endpoints: list[str], files: pki.ClusterFiles) -> bool:
    etcd: Client = client(endpoints, tls_of(files), timeout=5)
    try:
        await etcd.get(b"health")
    except Exception:
        return False
    finally:
        await etcd.close()
    return True


def test_etcd_refuses_a_revoked_certificate_once_the_crl_names_it(tmp_path: Path) -> None:
    first = pki.ClusterFiles(tmp_path / "a")
    authority = pki.init_cluster(first, "node-a", LOCAL)
    third = node_files(tmp_path, authority, "node-c")
    first.write_crl(pki.make_crl(authority, []))

    with etcd_cluster(1, member_tls=lambda _name: tls_of(first), client_tls=tls_of(first)) as etcd:
        member = etcd.members[0]
        crl = str(first.crl)
        etcd.members[0] = dataclasses.replace(
            member, extra_args=("--client-crl-file", crl, "--peer-crl-file", crl)
        )
        etcd.restart(0)

        async def scenario() -> None:
            assert await answers(etcd.endpoints, third)
            now = time.time()
            serial = pki.serial_hex(third.node_certificate())
            from datetime import UTC, datetime

            await asyncio.to_thread(
                first.write_crl,
                pki.make_crl(authority, [(serial, datetime.fromtimestamp(now, UTC))]),
            )
            # read at each new connection: no restart
            assert not await answers(etcd.endpoints, third)
            assert await answers(etcd.endpoints, first)

        run(scenario)


def test_a_certificate_near_its_end_is_renewed_by_another_node_for_its_own_id_only(
    tmp_path: Path,
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    first = pki.ClusterFiles(tmp_path / "a")
    authority = pki.init_cluster(first, "node-a", LOCAL)
    second = node_files(tmp_path, authority, "node-b")
    old = second.node_certificate()
    late = old.not_valid_after_utc.timestamp() - 3600  # less than a third of its life left

    async def scenario() -> None:
        async with client(etcd1.endpoints, timeout=10) as store:
            await store.put((KEYS["nodes"] + "node-b").encode(), record("node-b"))
            gate = trust.Trust(store, dict)
            await gate.start()
            server = PeerServer(
                "node-a",
                NodeTls.of(first),
                authority=authority,
                desk=EtcdJoinDesk(store),
                gate=gate.refusal,
            )
            await server.start("127.0.0.1", join_port=None)
            a = NodeRecord(
                id="node-a",
                name="a",
                address="127.0.0.1",
                peer_port=server.peer_port,
                capacity=NodeCapacity(cpu=1, memory=1),
            )
            try:
                assert (
                    await trust.renew_if_due("node-b", second, None, store, {"node-a": a}) is None
                )
                renewed = await trust.renew_if_due(
                    "node-b", second, None, store, {"node-a": a}, now=late
                )
                assert renewed is not None
                assert second.node_certificate() == renewed  # written over the old one
                assert pki.node_id_of(renewed) == "node-b"
                assert renewed.public_key() != old.public_key()  # a new key
                assert trust.names_of(renewed) == trust.names_of(old)
                assert renewed.serial_number != old.serial_number
                issued = await store.get_prefix(f"{KEYS['certificates']}node-b/".encode())
                assert pki.serial_hex(renewed) in {k.key.decode().rsplit("/")[-1] for k in issued}
                tls = NodeTls.of(second)
                async with Peer("127.0.0.1", server.peer_port, tls, "node-a") as peer:
                    assert (await peer.ping()).peer == "node-b"
                # another node's id is never signed for it
                other = pki.make_csr(pki.make_key(), "node-a", LOCAL)
                with pytest.raises(PeerError, match=r"^node node-b asked for a certificate of"):
                    await renew("127.0.0.1", server.peer_port, tls, other)
                # a revoked node gets none
                await trust.revoke(store, "node-b")
                await until(lambda: "node-b" in gate.revoked)
                own = pki.make_csr(pki.make_key(), "node-b", LOCAL)
                with pytest.raises(PeerError, match=r"^node node-b was removed from the cluster"):
                    await renew("127.0.0.1", server.peer_port, tls, own)
                # the node that holds the CA signs its own
                mine = await trust.renew_if_due("node-a", first, authority, store, {}, now=late)
                assert mine is not None and pki.issued_by(mine, authority.certificate)
            finally:
                await server.stop(None)
                await gate.stop()

    run(scenario)
