"""The cluster's trust, kept in etcd: the CA key any node signs with, the certificates
it issued, the nodes it revoked, and the check every node's peer port makes.

- **The CA key.** ``node init`` seals the CA's key with the cluster's secrets key
  (:func:`shared.cluster.pki.seal_key`, AES-256-GCM) and stores it under
  ``KEYS["ca_key"]`` (:func:`store_authority`). Every node holds the secrets key
  (each gets it in Join's reply), so every node opens it (:func:`authority_of`)
  and answers joins and makes join tokens: a cluster grows while any node is up,
  not only the one that ran init. Every node, not only etcd voters: a client node
  holds the secrets key and reads etcd like a voter, so keeping the CA key from it
  would protect nothing, and a cluster whose voters are all down cannot admit a
  node anyway (etcd refuses the join's writes).
- **Issued certificates.** Each certificate the CA signs is recorded under
  ``KEYS["certificates"]<node>/<serial>`` (:func:`record_issued`), so ``node rm``
  knows the serials to revoke.
- **Revocation.** ``node rm`` writes a :class:`~shared.wire.cluster.RevokedNode`
  (:func:`revoke`). :class:`Trust` watches those and answers each peer call
  (:meth:`Trust.refusal`): a revoked node, or a node id the cluster has no record
  of, is refused. Where the node holds the CA it also writes the CA's CRL
  (``crl.pem``) for its etcd member, which reads the file at every new TLS
  connection (etcd's ``--client-crl-file``/``--peer-crl-file``). Once all of a
  revoked node's certificates have expired its record goes (:func:`prune`, every
  PRUNE_EVERY from each node's :class:`Trust`): TLS refuses them anyway.
- **Renewal.** A node certificate lives ``pki.NODE_VALID_DAYS`` (two years), less
  than a cluster may. A node whose certificate has less than a third of its life
  left makes a new key and has it signed (:func:`renew_if_due`): by the CA it
  holds, else by another node over the peer port (Node1 Renew, its own id only).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aetcd  # type: ignore[import-untyped]
from cryptography import x509

from shared.cluster import peer, pki
from shared.wire import WireError, decode, encode
from shared.wire.cluster import KEYS, IssuedCertificate, NodeRecord, RevokedNode, SealedCaKey

log = logging.getLogger("zlayer.cluster.trust")

ETCD_ERRORS = (aetcd.ClientError, OSError, TimeoutError)
RETRY = 1.0
PRUNE_EVERY = 6 * 3600.0  # seconds between looks for revocations whose certificates ended


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def store_authority(client: Any, authority: pki.Authority, secrets_key: bytes) -> bool:
    """Seal the CA's key into etcd unless a key is there already (one transaction); True
    if this call stored it."""
    nonce, sealed = await asyncio.to_thread(pki.seal_key, authority, secrets_key)
    record = SealedCaKey(ca_sha256=authority.fingerprint, nonce=_b64(nonce), sealed=_b64(sealed))
    key = KEYS["ca_key"].encode()
    tx = client.transactions
    stored, _ = await client.transaction(
        compare=[tx.create(key) == 0], success=[tx.put(key, encode(record).encode())], failure=[]
    )
    return bool(stored)


async def load_authority(client: Any, ca: Any, secrets_key: bytes) -> pki.Authority | None:
    """The CA with its key, opened from etcd; None if etcd holds none (a cluster made
    before the key was kept there); PkiError if it does not open."""
    found = await client.get(KEYS["ca_key"].encode())
    if found is None:
        return None
    try:
        record = decode(found.value, SealedCaKey)
        nonce = base64.b64decode(record.nonce, validate=True)
        sealed = base64.b64decode(record.sealed, validate=True)
    except (WireError, binascii.Error, ValueError):
        raise pki.PkiError("the cluster CA's key in the cluster's store is damaged") from None
    if record.ca_sha256 != pki.fingerprint(ca):
        raise pki.PkiError(
            "the CA key in the cluster's store is another CA's; this node's ca.crt is not "
            "the cluster's: join this node to the cluster again"
        )
    return await asyncio.to_thread(pki.open_key, ca, nonce, sealed, secrets_key)


async def authority_of(
    client: Any, files: pki.ClusterFiles, secrets_key: bytes | None
) -> pki.Authority | None:
    """The CA this node signs with: its ``ca.key`` (the node that ran init; the key is
    put into etcd too if it is not there yet), else the one sealed in etcd; None when
    neither is at hand (no secrets key, or etcd holds no CA key)."""
    if files.ca_key.exists():
        authority = await asyncio.to_thread(files.authority)
        if secrets_key is not None and await store_authority(client, authority, secrets_key):
            log.info("the cluster CA's key is now kept in etcd, sealed: every node signs joins")
        return authority
    if secrets_key is None:
        return None
    ca = await asyncio.to_thread(files.ca_certificate)
    return await load_authority(client, ca, secrets_key)


async def record_issued(client: Any, certificate: Any) -> None:
    """Keep the serial of a node certificate the CA signed, under its node."""
    node = pki.node_id_of(certificate)
    serial = pki.serial_hex(certificate)
    record = IssuedCertificate(
        node=node,
        serial=serial,
        not_after=certificate.not_valid_after_utc.timestamp(),
        issued_at=time.time(),
    )
    key = f"{KEYS['certificates']}{node}/{serial}".encode()
    await client.put(key, encode(record).encode())


async def revoke(client: Any, node: str) -> RevokedNode:
    """``node rm``: the node's certificates revoked (every peer port refuses it, etcd's
    members once their CRL is written)."""
    serials: list[str] = []
    not_after = 0.0
    for kv in await client.get_prefix(f"{KEYS['certificates']}{node}/".encode()):
        try:
            issued = decode(kv.value, IssuedCertificate)
        except WireError:
            continue
        serials.append(issued.serial)
        not_after = max(not_after, issued.not_after)
    record = RevokedNode(
        node=node, serials=sorted(serials), revoked_at=time.time(), not_after=not_after
    )
    await client.put((KEYS["revoked"] + node).encode(), encode(record).encode())
    return record


async def prune(client: Any, now: float | None = None) -> list[str]:
    """Forget the revocations whose certificates have all expired (and those
    certificates' records): TLS refuses an expired certificate anyway, and a node id
    with no record is refused as unknown. Each goes in one transaction, only if
    unchanged since it was read. The nodes forgotten."""
    when = time.time() if now is None else now
    prefix = KEYS["revoked"].encode()
    tx = client.transactions
    pruned: list[str] = []
    for kv in await client.get_prefix(prefix):
        record = _revoked(kv.value)
        # not_after 0: no certificate of it was recorded, so none is known to have ended
        if record is None or not 0 < record.not_after < when:
            continue
        issued = f"{KEYS['certificates']}{record.node}/".encode()
        done, _ = await client.transaction(
            compare=[tx.mod(bytes(kv.key)) == kv.mod_revision],
            success=[
                tx.delete(bytes(kv.key)),
                tx.delete(issued, aetcd.utils.prefix_range_end(issued)),
            ],
            failure=[],
        )
        if done:
            pruned.append(record.node)
    if pruned:
        log.info("revocations of expired certificates forgotten: %s", ", ".join(sorted(pruned)))
    return pruned


def removed(node: str) -> str:
    return (
        f"node {node} was removed from the cluster and its certificate revoked; "
        "to bring it back, join it again with a new token (zlayerctl node join-token)"
    )


def unknown(node: str) -> str:
    return (
        f"node {node} is not a node of this cluster (it has no record); "
        "a node calls others only while it is in the cluster"
    )


class Trust:
    """The revoked nodes, kept current from a watch; the peer port's check of a caller;
    the CRL file where this node holds the CA."""

    def __init__(
        self,
        client: Any,
        live: Callable[[], Mapping[str, NodeRecord]],
        files: pki.ClusterFiles | None = None,
        authority: pki.Authority | None = None,
    ) -> None:
        self.client = client
        self.live = live
        self.files = files
        self.authority = authority
        self.revoked: dict[str, RevokedNode] = {}
        self.loaded = asyncio.Event()
        self._crl_entries: list[tuple[str, datetime.datetime]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pruning: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Watch the revocations; returns once they were read (or after a first try)."""
        self._task = asyncio.create_task(self._watch(), name="revocations")
        self._pruning = asyncio.create_task(self._prune(), name="revocations-prune")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.loaded.wait(), 10.0)

    async def stop(self) -> None:
        for task in (self._task, self._pruning):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._pruning = None

    async def _prune(self) -> None:
        """Forget revocations of expired certificates now and then (every node does:
        each deletion is guarded, so two nodes at once do no harm)."""
        while True:
            try:
                await prune(self.client)
            except ETCD_ERRORS as exc:
                log.warning("cannot forget expired revocations yet: %s", exc)
            await asyncio.sleep(PRUNE_EVERY)

    async def refusal(self, caller: str) -> str | None:
        """Why a call from the node certificate of ``caller`` is refused; None if it is not."""
        if caller in self.revoked:
            return removed(caller)
        if caller in self.live():
            return None
        # not seen yet (it has just started): the store decides; if it does not
        # answer, the revocations this node knows decide alone
        try:
            found = await asyncio.wait_for(self.client.get((KEYS["nodes"] + caller).encode()), 5.0)
            revoked = await asyncio.wait_for(
                self.client.get((KEYS["revoked"] + caller).encode()), 5.0
            )
        except ETCD_ERRORS:
            return None
        if revoked is not None:
            return removed(caller)
        return None if found is not None else unknown(caller)

    async def _watch(self) -> None:
        prefix = KEYS["revoked"].encode()
        while True:
            try:
                listed = await self.client.get_prefix(prefix)
                found: dict[str, RevokedNode] = {}
                for kv in listed:
                    record = _revoked(kv.value)
                    if record is not None:
                        found[record.node] = record
                self.revoked = found
                await self._changed()
                self.loaded.set()
                watch = await self.client.watch(
                    prefix,
                    range_end=aetcd.utils.prefix_range_end(prefix),
                    start_revision=listed.header.revision + 1,
                )
                try:
                    async for event in watch:
                        node = event.kv.key[len(prefix) :].decode()
                        if event.kind == "DELETE":
                            self.revoked.pop(node, None)
                        else:
                            record = _revoked(event.kv.value)
                            if record is None:
                                continue
                            self.revoked[record.node] = record
                        await self._changed()
                finally:
                    with contextlib.suppress(*ETCD_ERRORS):
                        await watch.cancel()
            except ETCD_ERRORS as exc:
                log.warning("watching the revoked nodes broke (%s); reading them again", exc)
            self.loaded.set()
            await asyncio.sleep(RETRY)

    async def _changed(self) -> None:
        if self.files is None or self.authority is None:
            return
        authority, files = self.authority, self.files
        entries = sorted(
            (serial, datetime.datetime.fromtimestamp(record.revoked_at, datetime.UTC))
            for record in self.revoked.values()
            for serial in record.serials
        )
        if entries == self._crl_entries:
            return

        def write() -> None:
            files.write_crl(pki.make_crl(authority, entries))

        try:
            await asyncio.to_thread(write)
        except (OSError, pki.PkiError) as exc:
            log.error("cannot write the CA's revocation list %s: %s", files.crl, exc)
            return
        self._crl_entries = entries
        log.info("the revocation list names %d certificates", len(entries))


def _revoked(raw: bytes) -> RevokedNode | None:
    try:
        return decode(raw, RevokedNode)
    except WireError:
        return None


def due(certificate: x509.Certificate, now: float | None = None) -> bool:
    """Whether less than a third of the certificate's life is left."""
    start = certificate.not_valid_before_utc.timestamp()
    end = certificate.not_valid_after_utc.timestamp()
    return end - (time.time() if now is None else now) < (end - start) / 3


def names_of(certificate: x509.Certificate) -> list[str]:
    """The IP addresses and host names a certificate names (its node's addresses)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in names if isinstance(n, x509.IPAddress | x509.DNSName)]


async def renew_if_due(
    node_id: str,
    files: pki.ClusterFiles,
    authority: pki.Authority | None,
    client: Any,
    live: Mapping[str, NodeRecord],
    now: float | None = None,
) -> x509.Certificate | None:
    """A new key and certificate (same id and names) written over the node's own, when
    its certificate is due (:func:`due`); None when it is not. Signed by ``authority``
    if this node holds it, else by the first live node that answers Node1 Renew."""
    current = await asyncio.to_thread(files.node_certificate)
    if not due(current, now):
        return None
    key = pki.make_key()
    csr = pki.make_csr(key, node_id, names_of(current))
    if authority is not None:
        renewed = await asyncio.to_thread(authority.sign, csr)
        await record_issued(client, renewed)
    else:
        tls = await asyncio.to_thread(peer.NodeTls.of, files)
        failures: list[str] = []
        for other in sorted(live.values(), key=lambda r: r.id):
            if other.id == node_id:
                continue
            try:
                renewed = await peer.renew(
                    peer.peer_address(other, live.get(node_id)),
                    other.peer_port,
                    tls,
                    csr,
                    expect_node=other.id,
                )
                break
            except peer.PeerError as exc:
                failures.append(f"{other.id}: {exc}")
        else:
            raise pki.PkiError(
                "no node renewed this node's certificate ("
                + ("; ".join(failures) or "no other node is live")
                + "); it is tried again later"
            )
    await asyncio.to_thread(files.write_node, key, renewed)
    log.info("node %s's certificate renewed: valid until %s", node_id, renewed.not_valid_after_utc)
    return renewed
