"""Revocations are forgotten once every certificate they name has expired (TLS refuses
those anyway), on real etcd: the record and its certificates' records go, the rest
stay, and a forgotten node is still refused at the peer port (it is unknown)."""

from __future__ import annotations

import asyncio
import time

from shared.cluster import trust
from shared.cluster.etcd import Client, client
from shared.wire import encode
from shared.wire.cluster import KEYS, IssuedCertificate, RevokedNode
from tests.etcd_fixture import EtcdCluster, etcd1  # noqa: F401  (a fixture)

HOUR = 3600.0


async def _revoked(etcd: Client, node: str, not_after: float, serials: list[str]) -> None:
    for serial in serials:
        issued = IssuedCertificate(node=node, serial=serial, not_after=not_after)
        key = f"{KEYS['certificates']}{node}/{serial}".encode()
        await etcd.put(key, encode(issued).encode())
    record = RevokedNode(
        node=node, serials=serials, revoked_at=time.time() - HOUR, not_after=not_after
    )
    await etcd.put((KEYS["revoked"] + node).encode(), encode(record).encode())


async def _held(etcd: Client, kind: str) -> list[str]:
    prefix = KEYS[kind].encode()
    return sorted(bytes(kv.key)[len(prefix) :].decode() for kv in await etcd.get_prefix(prefix))


async def _three_revocations(etcd: Client) -> None:
    now = time.time()
    await _revoked(etcd, "ended", now - HOUR, ["0a", "0b"])  # both certificates expired
    await _revoked(etcd, "valid", now + HOUR, ["1a"])  # one still valid
    await _revoked(etcd, "unrecorded", 0.0, [])  # no certificate known: kept
    issued = IssuedCertificate(node="live", serial="2a", not_after=now + HOUR)
    await etcd.put(f"{KEYS['certificates']}live/2a".encode(), encode(issued).encode())


def test_expired_revocations_and_their_certificates_are_forgotten(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def run() -> None:
        async with client(etcd1.endpoints, timeout=10) as etcd:
            await _three_revocations(etcd)
            assert await trust.prune(etcd) == ["ended"]
            assert await _held(etcd, "revoked") == ["unrecorded", "valid"]
            assert await _held(etcd, "certificates") == ["live/2a", "valid/1a"]
            assert await trust.prune(etcd) == []  # nothing more to forget
            # an hour and more later, the other one's certificate has ended too
            assert await trust.prune(etcd, now=time.time() + 2 * HOUR) == ["valid"]
            assert await _held(etcd, "revoked") == ["unrecorded"]

    asyncio.run(run())


def test_a_nodes_trust_forgets_them_and_still_refuses_the_forgotten_node(
    etcd1: EtcdCluster,  # noqa: F811
) -> None:
    async def run() -> None:
        async with client(etcd1.endpoints, timeout=10) as etcd:
            await _three_revocations(etcd)
            gate = trust.Trust(etcd, dict)
            await gate.start()
            try:
                deadline = time.monotonic() + 10
                while "ended" in gate.revoked or await _held(etcd, "revoked") != [
                    "unrecorded",
                    "valid",
                ]:
                    assert time.monotonic() < deadline, gate.revoked
                    await asyncio.sleep(0.1)
                assert sorted(gate.revoked) == ["unrecorded", "valid"]
                assert await gate.refusal("ended") == trust.unknown("ended")
                assert await gate.refusal("valid") == trust.removed("valid")
            finally:
                await gate.stop()

    asyncio.run(run())
