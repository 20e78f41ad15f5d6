"""schedd in a cluster: this node's membership, its peer server, and the node commands.

With ``cluster.toml`` (:mod:`shared.cluster.config`) schedd keeps its desired
state in etcd (:class:`~daemons.schedd.etcdstore.EtcdStore`) and opens a
:class:`ClusterContext`: this node's record under a lease and the election
(:class:`~daemons.schedd.membership.Membership`), its ``zlayer.Node1`` server
(peer and join ports; it answers joins with the CA key sealed in etcd, which any
node opens, :mod:`shared.cluster.trust`) and an etcd client. Its peer port refuses
a node ``node rm`` revoked, or one the cluster has no record of. The scheduler
reads it as ``scheduler.cluster`` (None on a lone node).

:class:`NodeControl` answers Scheduler1's node methods:

- ``NodeInit`` makes the CA and this node's certificate, writes cluster.toml
  with an etcd member, has it started (``zlayerctl daemon run``'s supervisor is
  sent SIGUSR1; under systemd ``zlayer-etcd.service`` is started), waits until
  it answers, moves the SQLite state into it and switches schedd's store in
  place (the reconcile loop is stopped meanwhile; no restart).
- ``NodeJoin`` joins through the node in the token (:func:`peer.join`), and
  adds an etcd member for this node while the cluster has fewer than its
  settings' voters (``node init --etcd-voters``, 3 by default; etcd's ``member
  add``, then the member starts with the initial cluster state ``existing``); a
  client of the members after that, which writes the members' client URLs to
  its cluster.toml as they change. ``node rm`` of a voter asks one client to
  become a voter (``NodeSettings.voter``): it adds and starts its own member.
- Addresses: init records the cluster's replica range and each node takes a
  block of it (:mod:`daemons.schedd.cluster_blocks`); ``node rm`` frees it.
  A lone node's own deployments are not carried into the cluster: it must
  have none.
- The mesh: unless schedd's ``[cluster] mesh = false``, the node has overlayd
  bring its WireGuard interface up (``EnableMesh``) at init, join and every
  start, and keeps its public key and port current in its record (a rotated
  key, an overlayd restart), so the other nodes reach its block through it. A
  node ``behind_nat``, or whose join came from another address than its own
  (the answering node saw a NAT), joins as an etcd client and says so in its
  record.
- Labels, drain (and undrain) and removal are :class:`~shared.wire.cluster.NodeSettings`
  under ``KEYS["node_settings"]``, kept without a lease and written from any
  node; each node watches its own and applies it to its record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aetcd  # type: ignore[import-untyped]
import msgspec

from daemons.schedd import cluster_blocks
from daemons.schedd.backend import ClusterSettings, SchedSettings
from daemons.schedd.etcdstore import EtcdStore, MoveRefusedError, move_to_etcd
from daemons.schedd.membership import ETCD_ERRORS, Membership
from daemons.schedd.secrets import SealingKey, reseal
from shared.bus import (
    AlreadyExistsError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    ZLayerError,
)
from shared.cluster import blocks, jointoken, peer, pki, secretkey, trust
from shared.cluster import config as cluster_config
from shared.cluster.config import ClusterConfig, EtcdMemberConfig
from shared.cluster.etcd import Client, TLSFiles, client, retrying, wait_healthy
from shared.config import ConfigError
from shared.logs import under_systemd
from shared.nodekey import NodeKey, NodeKeyError
from shared.paths import Paths
from shared.tasks import cancel_all
from shared.wire import WireError, decode, encode
from shared.wire.cluster import KEYS, NodeCapacity, NodeList, NodeRecord, NodeSettings
from shared.wire.mesh import MeshStatus

if TYPE_CHECKING:
    from daemons.schedd.store import Store
    from shared.clients import OverlayClient

log = logging.getLogger("zlayer.schedd.cluster")
T = TypeVar("T")

ENDPOINTS_CHECK = 10.0  # seconds between looks at the etcd members' client URLs
ETCD_START_TIMEOUT = 30.0
MEMBER_ADD_TIMEOUT = 30.0  # etcd counts a new member after it has been connected 5 s
CALL_TIMEOUT = 5.0
# node rm is tried again while etcd answers that it cannot now (its members just lost
# one, a leader is being elected); each of its steps is safe to take twice.
REMOVE_TIMEOUT = 20.0
ETCD_UNIT = "zlayer-etcd.service"
SUPERVISOR_ENV = "ZLAYER_SUPERVISOR_PID"  # shared.daemon's: the supervisor's pid
MESH_CHECK = 2.0  # seconds between looks at overlayd's mesh (a rotated key, a restart)
CERTIFICATE_CHECK = 3600.0  # seconds between looks at the node certificate's end
BEHIND_NAT = (
    "it is behind NAT (schedd's [cluster] behind_nat): the other nodes cannot reach it "
    "first, so they wait for its mesh handshake and it is no etcd voter"
)


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{port}"


def _local_url(config: ClusterConfig) -> str:
    loopback = "[::1]" if ":" in config.advertise else "127.0.0.1"
    return f"https://{loopback}:{cluster_config.ETCD_CLIENT_PORT}"


def tls_of(files: pki.ClusterFiles) -> TLSFiles:
    """The node's files for etcd; a client of several members checks the name every node
    certificate carries (one gRPC target of several addresses is no one host name)."""
    return TLSFiles(
        ca=files.ca_cert, cert=files.node_cert, key=files.node_key, server_name=pki.ANY_NODE
    )


def cluster_client(endpoints: list[str], tls: TLSFiles, timeout: float = CALL_TIMEOUT) -> Client:
    return client(endpoints, tls, timeout)


def new_node_id() -> str:
    """The hostname, made a DNS label, and a random suffix: hostnames repeat."""
    base = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:48] or "node"
    return f"{base}-{secrets.token_hex(3)}"


def capacity() -> NodeCapacity:
    """What this machine offers: the CPUs schedd may run on, all of its memory."""
    cpus = float(len(os.sched_getaffinity(0)))
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return NodeCapacity(cpu=cpus, memory=int(memory))


def default_address() -> str:
    """This node's IPv4 address on its default route: the one the kernel would send
    from to a far address. Connecting a UDP socket sends nothing, and needs no netlink
    (schedd's unit allows only AF_UNIX and AF_INET/AF_INET6)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed like any far address
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith("127.") or address == "0.0.0.0":
        raise InvalidArgumentError(
            "this node has no IPv4 address on a default route other nodes could reach; "
            "give one with --advertise"
        )
    return address


def schedd_settings(paths: Paths) -> ClusterSettings:
    """Blocking: schedd's ``[cluster]`` section (the mesh's settings); its defaults when
    the file does not read (schedd itself would not have started with it)."""
    try:
        return SchedSettings.load("schedd", paths).cluster
    except ConfigError:
        return ClusterSettings()


def mesh_fields(
    settings: ClusterSettings, status: MeshStatus | None, nat_seen: str = ""
) -> dict[str, Any]:
    """What a node's record says of its mesh, from overlayd's status (None: unknown yet);
    ``nat_seen``: the NAT its join showed (NodeSettings.reachability), "" if none."""
    on = settings.mesh and status is not None and status.enabled
    reason = BEHIND_NAT if settings.behind_nat else nat_seen
    return {
        "wireguard_key": status.public_key if on and status is not None else "",
        "mesh_port": status.listen_port if on and status is not None else 0,
        "mesh_keepalive": settings.mesh_keepalive if settings.mesh else 0,
        "reachable": not reason,
        "reachability": reason,
    }


def nat_seen(advertised: str, source: str) -> str:
    """Why a joining node is behind NAT, when the node it joined through saw the join
    come from another address than the one it advertises ("" when not: no source
    known, the same address, or loopback, a node on the same host)."""
    try:
        seen = ipaddress.ip_address(source)
        own = ipaddress.ip_address(advertised)
    except ValueError:
        return ""
    if seen == own or seen.is_loopback:
        return ""
    return (
        f"it is behind NAT (its join came from {seen}, not its address {own}): the other "
        "nodes cannot reach it first, so they wait for its mesh handshake and it is no "
        "etcd voter"
    )


def _overlay() -> OverlayClient:
    """overlayd on the daemon's bus (shared.daemon makes it the default)."""
    import sdbus

    from shared.clients import OverlayClient

    return OverlayClient(sdbus.get_default_bus())


async def mesh_status(overlay: OverlayClient, port: int) -> MeshStatus:
    """overlayd's mesh, brought up on ``port`` first where it is off (EnableMesh is
    idempotent and keeps the key overlayd holds)."""
    status = await asyncio.wait_for(overlay.get_mesh(), CALL_TIMEOUT)
    if not status.enabled or status.listen_port != port:
        status = await asyncio.wait_for(overlay.enable_mesh(port), CALL_TIMEOUT)
    return status


def member_config(
    paths: Paths, node_id: str, advertise: str, initial: dict[str, str], state: str
) -> EtcdMemberConfig:
    """The etcd member this node runs: on its address and its loopback, its data in its
    state dir; ``initial`` names the other members' peer URLs."""
    peer_url = _url(advertise, cluster_config.ETCD_PEER_PORT)
    local = "[::1]" if ":" in advertise else "127.0.0.1"
    return EtcdMemberConfig(
        name=node_id,
        data_dir=str(paths.state_dir / "etcd"),
        client_urls=[
            _url(advertise, cluster_config.ETCD_CLIENT_PORT),
            f"https://{local}:{cluster_config.ETCD_CLIENT_PORT}",
        ],
        advertise_client_urls=[_url(advertise, cluster_config.ETCD_CLIENT_PORT)],
        peer_urls=[peer_url],
        initial_cluster={**initial, node_id: peer_url},
        initial_state="new" if state == "new" else "existing",
    )


def _settings_key(node_id: str) -> bytes:
    return (KEYS["node_settings"] + node_id).encode()


def _settings(raw: bytes | None) -> NodeSettings | None:
    if raw is None:
        return None
    try:
        return decode(raw, NodeSettings)
    except WireError:
        return None


# ------------------------------------------------------------ the etcd member's process


async def sync_member(paths: Paths) -> None:
    """Have this node's etcd member run, or stop, as cluster.toml now says: the
    supervisor re-reads it on SIGUSR1; systemd starts or stops the unit."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor:
        try:
            os.kill(int(supervisor), signal.SIGUSR1)
        except (ValueError, ProcessLookupError, PermissionError) as exc:
            raise UnavailableError(
                f"schedd cannot reach its supervisor (pid {supervisor}: {exc}) to start etcd; "
                "restart ZLayer with zlayerctl daemon run"
            ) from None
        return
    if under_systemd():
        found = cluster_config.load(paths)
        verb = "start" if found is not None and found.etcd is not None else "stop"
        process = await asyncio.create_subprocess_exec(
            "systemctl",
            verb,
            "--no-block",
            ETCD_UNIT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, error = await process.communicate()
        if process.returncode != 0:
            raise UnavailableError(
                f"systemctl {verb} {ETCD_UNIT} failed ({error.decode().strip()}); "
                "check that the unit is installed"
            )
        return
    raise UnavailableError(
        "schedd runs under neither systemd nor zlayerctl daemon run, so it cannot start an "
        "etcd member; run ZLayer under one of them"
    )


# ------------------------------------------------------------ a node in its cluster


@dataclass
class ClusterContext:
    """What schedd holds in a cluster; ``scheduler.cluster`` (placement reads it)."""

    node_id: str
    config: ClusterConfig
    files: pki.ClusterFiles
    client: Client  # an etcd client on schedd's event loop
    store: EtcdStore
    membership: Membership
    peer: peer.PeerServer | None = None
    paths: Paths | None = None
    # the daemon's: called once this node was removed from the cluster (it goes lone)
    on_removed: Callable[[], Coroutine[Any, Any, None]] | None = None
    settings: ClusterSettings = field(default_factory=ClusterSettings)  # schedd's [cluster]
    _overlay: OverlayClient | None = None
    _mesh_said: str = ""  # the last mesh problem logged as a warning
    nat_seen: str = ""  # the NAT its join showed (NodeSettings.reachability)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _leaving: asyncio.Task[None] | None = None
    _promoting: asyncio.Task[None] | None = None
    _left: bool = False
    gate: trust.Trust | None = None  # the revoked nodes, the peer port's gate

    @classmethod
    async def open(
        cls,
        config: ClusterConfig,
        paths: Paths,
        store: EtcdStore | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> ClusterContext:
        """Join the live cluster as this node: record, election, peer server."""
        files = pki.ClusterFiles(Path(config.files))
        tls = tls_of(files)
        endpoints = list(config.etcd_endpoints)
        etcd = cluster_client(endpoints, tls)
        if store is None:
            store = EtcdStore(endpoints, tls)
        try:
            found = await retrying(lambda: etcd.get(_settings_key(config.node_id)), 10.0)
        except ETCD_ERRORS as exc:
            await etcd.close()
            await asyncio.to_thread(store.close)
            raise UnavailableError(
                f"the cluster's store (etcd at {', '.join(endpoints)}) does not answer: "
                f"{exc or type(exc).__name__}; check that etcd runs and that this node reaches it"
            ) from None
        settings = _settings(found.value if found is not None else None)
        schedd = await asyncio.to_thread(schedd_settings, paths)
        status = None
        if schedd.mesh:
            # the key in the first record, so no peer routes this node's block in the
            # clear meanwhile; overlayd not up yet (at boot): the mesh task sees to it
            with contextlib.suppress(Exception):
                status = await mesh_status(_overlay(), schedd.mesh_port)
        record = NodeRecord(
            id=config.node_id,
            name=config.name or socket.gethostname(),
            address=config.advertise,
            peer_port=config.peer_port,
            labels=dict(settings.labels if settings is not None else config.labels),
            capacity=capacity(),
            state=settings.state if settings is not None else "ready",
            etcd_member=config.etcd is not None,
            subnet=config.block,  # its block, if the cluster hands them out
            started_at=time.time(),
            **mesh_fields(schedd, status, settings.reachability if settings else ""),
        )
        membership = Membership(record, endpoints, tls, on_change=on_change)
        context = cls(
            config.node_id,
            config,
            files,
            etcd,
            store,
            membership,
            paths=paths,
            settings=schedd,
            nat_seen=settings.reachability if settings is not None else "",
        )
        try:
            await membership.start()
            await context._serve()
        except BaseException:
            await context.close()
            raise
        context._tasks.append(asyncio.create_task(context._watch_settings(), name="node-settings"))
        context._tasks.append(asyncio.create_task(context._keep_endpoints(), name="etcd-urls"))
        context._tasks.append(
            asyncio.create_task(context._keep_certificate(), name="node-certificate")
        )
        if schedd.mesh:
            context._tasks.append(asyncio.create_task(context._keep_mesh(), name="node-mesh"))
        return context

    async def _serve(self) -> None:
        node_tls = await asyncio.to_thread(peer.NodeTls.of, self.files)
        # handed to each node that joins through this one
        key = await asyncio.to_thread(secretkey.read, self.files)
        try:
            # any node signs: its ca.key (init), else the key sealed in etcd
            authority = await trust.authority_of(self.client, self.files, key)
        except (pki.PkiError, *ETCD_ERRORS) as exc:
            log.warning("node %s cannot sign joins: %s", self.node_id, exc)
            authority = None
        if authority is not None:
            with contextlib.suppress(*ETCD_ERRORS):
                await trust.record_issued(
                    self.client, await asyncio.to_thread(self.files.node_certificate)
                )
        self.gate = trust.Trust(self.client, self.membership.live, self.files, authority)
        await self.gate.start()
        self.peer = peer.PeerServer(
            self.node_id,
            node_tls,
            authority=authority,
            desk=peer.EtcdJoinDesk(self.client),
            secrets_key=key,
            gate=self.gate.refusal,
        )
        try:
            # the peer port on every address: a node behind NAT is called at its mesh
            # address (shared.cluster.peer.peer_address); mutual TLS and the gate guard all
            await self.peer.start(
                self.config.advertise,
                self.config.peer_port,
                self.config.join_port,
                peer_host=peer.wildcard(self.config.advertise),
            )
        except peer.PeerError:
            self.peer = None
            raise

    async def _keep_certificate(self) -> None:
        """Renew the node certificate once a third of its life is left; the peer server
        starts again with it (etcd reads its files at each handshake; schedd's etcd
        clients and apid's calls to other nodes take the new files within a minute)."""
        while True:
            try:
                authority = self.peer.authority if self.peer is not None else None
                live = self.membership.live()
                renewed = await trust.renew_if_due(
                    self.node_id, self.files, authority, self.client, live
                )
                if renewed is not None and self.peer is not None:
                    await self.peer.stop(0.5)
                    if self.gate is not None:
                        await self.gate.stop()
                    self.peer = None
                    await self._serve()
            except Exception as exc:  # tried again at the next look
                log.warning("cannot renew node %s's certificate yet: %s", self.node_id, exc)
            await asyncio.sleep(CERTIFICATE_CHECK)

    async def close(self) -> None:
        await cancel_all(self._tasks)
        await self._leave()
        if self.peer is not None:
            await self.peer.stop(0.5)
            self.peer = None
        if self.gate is not None:
            await self.gate.stop()
        with contextlib.suppress(*ETCD_ERRORS):
            await self.client.close()
        await asyncio.to_thread(self.store.close)

    async def _leave(self) -> None:
        """Stop the membership once: the lease is revoked, the record and leadership go."""
        if self._left:
            return
        self._left = True
        with contextlib.suppress(*ETCD_ERRORS):
            await self.membership.stop()

    # ------------------------------------------------------------ the mesh

    async def _keep_mesh(self) -> None:
        """Keep overlayd's mesh on and this node's record saying its key and port: a key
        rotated (``zlayerctl node rotate-key``) or a mesh lost with overlayd is seen
        within MESH_CHECK, and the other nodes take it from the record."""
        while True:
            try:
                await self.refresh_mesh()
            except Exception as exc:  # overlayd or etcd away: looked at again
                said = str(exc) or type(exc).__name__
                if said != self._mesh_said:
                    self._mesh_said = said
                    log.warning("cannot bring the mesh up or publish its key yet: %s", said)
            await asyncio.sleep(MESH_CHECK)

    async def refresh_mesh(self) -> MeshStatus:
        """Once: the mesh on, its key and port in this node's record; overlayd's status."""
        if self._overlay is None:
            self._overlay = _overlay()
        status = await mesh_status(self._overlay, self.settings.mesh_port)
        if not status.enabled and status.reason != self._mesh_said:
            self._mesh_said = status.reason
            log.warning("overlayd's mesh is off: %s", status.reason)
        record = self.membership.record
        changed = msgspec_replace(record, **mesh_fields(self.settings, status, self.nat_seen))
        if changed != record:
            await self.membership.update(changed)
            log.info(
                "node %s's mesh key is %s (port %d)",
                self.node_id,
                changed.wireguard_key or "none",
                changed.mesh_port,
            )
        return status

    async def rotate_mesh_key(self) -> NodeRecord:
        """A new key pair for this node's mesh (overlayd keeps the interface running),
        in its record at once: the other nodes take the new key from there."""
        if not self.settings.mesh:
            raise ConflictError(
                "this node's mesh is off (schedd's [cluster] mesh = false); turn it on "
                "before rotating its key"
            )
        if self._overlay is None:
            self._overlay = _overlay()
        overlay = self._overlay
        try:
            before = await mesh_status(overlay, self.settings.mesh_port)
            if not before.enabled:
                raise ConflictError(
                    f"this node's mesh is off ({before.reason or 'overlayd says so'}); "
                    "turn it on before rotating its key"
                )
            status = await asyncio.wait_for(overlay.rotate_mesh_key(), CALL_TIMEOUT)
        except ZLayerError:
            raise
        except Exception as exc:
            raise UnavailableError(
                f"zlayer-overlayd does not answer ({exc or type(exc).__name__}); start it, "
                "then rotate the key again"
            ) from None
        record = self.membership.record
        changed = msgspec_replace(record, **mesh_fields(self.settings, status, self.nat_seen))
        await self._etcd(lambda: self.membership.update(changed))
        log.info("node %s's mesh has a new key %s", self.node_id, changed.wireguard_key)
        return self.membership.record

    async def _keep_endpoints(self) -> None:
        """Keep cluster.toml's etcd endpoints the members' client URLs, so a node (a
        client above all) reaches voters that joined after it when it starts again."""
        while True:
            await asyncio.sleep(ENDPOINTS_CHECK)
            with contextlib.suppress(*ETCD_ERRORS):
                urls = await cluster_blocks.member_endpoints(self.client)
                if urls and sorted(urls) != sorted(self.config.etcd_endpoints):
                    self.config = msgspec_replace(self.config, etcd_endpoints=urls)
                    if self.paths is not None and not self._left:
                        await asyncio.to_thread(cluster_config.save, self.paths, self.config)
                    log.info("the cluster's etcd members answer at %s", ", ".join(urls))

    # ------------------------------------------------------------ settings

    async def _watch_settings(self) -> None:
        """Apply this node's settings (labels, drain, removal) as they change."""
        key = _settings_key(self.node_id)
        while True:
            try:
                # the watch first: a change between it and the read is seen twice, not lost
                watch = await self.client.watch(key)
                try:
                    found = await self.client.get(key)
                    if found is not None and await self._apply(_settings(found.value)):
                        return
                    async for event in watch:
                        if event.kind == "PUT" and await self._apply(_settings(event.kv.value)):
                            return
                finally:
                    with contextlib.suppress(*ETCD_ERRORS):
                        await watch.cancel()
            except ETCD_ERRORS as exc:
                log.warning("watching this node's settings broke (%s); reading them again", exc)
            await asyncio.sleep(0.5)

    async def _apply(self, settings: NodeSettings | None) -> bool:
        """True once the node has been removed from the cluster."""
        if settings is None:
            return False
        if settings.removed:
            log.warning("node %s was removed from the cluster; it leaves", self.node_id)
            await self._leave()  # its record goes now, whatever the daemon does next
            if self.paths is not None:
                # lone at its next start; its etcd member (removed from etcd) stops
                await asyncio.to_thread(cluster_config.remove, self.paths)
                with contextlib.suppress(ZLayerError):
                    await sync_member(self.paths)
            if self.on_removed is not None:
                # its own task: leaving closes this context, and this watch with it
                self._leaving = asyncio.create_task(self.on_removed(), name="leave-cluster")
                self._leaving.add_done_callback(_log_failure)
            return True
        record = self.membership.record
        changed = msgspec_replace(record, labels=dict(settings.labels), state=settings.state)
        if changed != record:
            await self.membership.update(changed)
        if settings.voter and self.config.etcd is None and self._promoting is None:
            self._promoting = asyncio.create_task(self._become_voter(), name="become-voter")
        return False

    async def _become_voter(self) -> None:
        """Asked to (a voter was removed): add this node's etcd member, start it and say
        so in its record. A failure is logged and the member it added taken out again."""
        assert self.paths is not None
        paths, address = self.paths, self.config.advertise
        peer_url = _url(address, cluster_config.ETCD_PEER_PORT)
        added: int | None = None

        async def add() -> None:
            nonlocal added
            added = (await self.client.add_member([peer_url])).id

        try:
            members = [m async for m in self.client.members()]
            initial = {m.name: ",".join(m.peer_urls) for m in members if m.name}
            await change_members(add)
            member = member_config(paths, self.node_id, address, initial, "existing")
            await asyncio.to_thread(shutil.rmtree, member.data_dir, True)
            own = _url(address, cluster_config.ETCD_CLIENT_PORT)
            urls = [*self.config.etcd_endpoints, own]
            self.config = msgspec_replace(self.config, etcd=member, etcd_endpoints=urls)
            await asyncio.to_thread(cluster_config.save, paths, self.config)
            await sync_member(paths)
            await wait_healthy([_local_url(self.config)], ETCD_START_TIMEOUT, tls_of(self.files))
            await self.membership.update(msgspec_replace(self.membership.record, etcd_member=True))
            log.info("node %s is an etcd voter now", self.node_id)
        except Exception as exc:
            log.error("node %s could not become an etcd voter: %s", self.node_id, exc)
            self.config = msgspec_replace(self.config, etcd=None)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(cluster_config.save, paths, self.config)
                await sync_member(paths)
                if added is not None:
                    await self.client.remove_member(added)

    async def _change_settings(
        self, node: str, change: Callable[[NodeSettings], NodeSettings], gone: bool = False
    ) -> NodeSettings:
        """Read-modify-write a node's settings in one transaction (tried again on a race).
        ``gone``: the node may be down (its record lapsed), as one being removed."""
        live = self.membership.live()
        key = _settings_key(node)
        tx = self.client.transactions
        for _ in range(10):
            found = await self.client.get(key)
            current = _settings(found.value if found is not None else None)
            if current is None and gone and node not in live:
                current = NodeSettings()
            if current is None:
                if node not in live:
                    raise NotFoundError(
                        f"no node {node} is in the cluster; zlayerctl node ls lists them"
                    )
                record = live[node]
                current = NodeSettings(labels=dict(record.labels), state=record.state)
            wanted = change(current)
            compare = (
                [tx.mod(key) == found.mod_revision] if found is not None else [tx.create(key) == 0]
            )
            ok, _ = await self.client.transaction(
                compare=compare, success=[tx.put(key, encode(wanted).encode())], failure=[]
            )
            if ok:
                return wanted
        raise UnavailableError(f"node {node}'s settings kept changing; try again")

    async def _etcd(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except ETCD_ERRORS as exc:
            raise UnavailableError(
                f"the cluster's store (etcd at {', '.join(self.config.etcd_endpoints)}) does "
                f"not answer: {exc or type(exc).__name__}; check that etcd runs"
            ) from None

    # ------------------------------------------------------------ node commands

    def list_nodes(self) -> NodeList:
        nodes = sorted(self.membership.live().values(), key=lambda r: (r.name, r.id))
        return NodeList(nodes=nodes, leader=self.membership.leader or "", this_node=self.node_id)

    async def join_token(self, ttl: float) -> str:
        if self.peer is None or self.peer.authority is None:
            raise InvalidArgumentError(
                f"node {self.node_id} does not sign joins (the cluster's store holds no CA "
                "key it can open); make the token on the node that ran zlayerctl node init"
            )
        token, record = jointoken.make(
            self.config.advertise,
            self.peer.join_port,
            self.peer.authority.fingerprint,
            ttl or jointoken.DEFAULT_TTL,
            created_by=self.node_id,
        )
        await self._etcd(lambda: jointoken.save(self.client, record))
        return token.text()

    async def label(self, node: str, labels: dict[str, str], remove: list[str]) -> NodeSettings:
        for key in [*labels, *remove]:
            if not key or "=" in key:
                raise InvalidArgumentError(
                    f"{key!r} is not a label key; write KEY=VALUE to set one and KEY- to remove it"
                )

        def change(settings: NodeSettings) -> NodeSettings:
            merged = {k: v for k, v in settings.labels.items() if k not in remove}
            merged.update(labels)
            return msgspec_replace(settings, labels=merged)

        result: NodeSettings = await self._etcd(lambda: self._change_settings(node, change))
        return result

    async def drain(self, node: str) -> NodeSettings:
        def change(settings: NodeSettings) -> NodeSettings:
            return msgspec_replace(settings, state="draining")

        result: NodeSettings = await self._etcd(lambda: self._change_settings(node, change))
        return result

    async def undrain(self, node: str) -> NodeSettings:
        """A drained node back in service (upstream's undrain): new placements may use it
        again; the replicas that left it stay where they went."""

        def change(settings: NodeSettings) -> NodeSettings:
            return msgspec_replace(settings, state="ready")

        result: NodeSettings = await self._etcd(lambda: self._change_settings(node, change))
        return result

    async def remove(self, node: str) -> None:
        if node == self.node_id:
            raise InvalidArgumentError(
                f"node {node} is this node; remove it from another node of the cluster"
            )

        async def run() -> None:
            # a node that is down (its record lapsed) is removed too, if the cluster
            # knows it: it holds a block or an etcd member
            members = [m async for m in self.client.members()]
            known = node in (await blocks.held(self.client)).values()
            known = known or any(m.name == node for m in members)
            await self._change_settings(
                node, lambda s: msgspec_replace(s, removed=True), gone=known
            )
            # its certificate refused from now on: peer ports at once, etcd by its CRL
            await trust.revoke(self.client, node)
            ids = [member.id for member in members if member.name == node]
            for member_id in ids:
                await change_members(functools.partial(self.client.remove_member, member_id))
            found = await self.client.get((KEYS["nodes"] + node).encode())
            if found is not None and found.lease:
                with contextlib.suppress(*ETCD_ERRORS):
                    await self.client.revoke_lease(found.lease)
            await self.client.delete((KEYS["nodes"] + node).encode())
            await blocks.release(self.client, node)
            # a voter gone (by this try or an earlier one): a client may be asked to become one
            await self._promote_a_client(node)

        # a second try finds what the first did done: the settings already say removed,
        # the member already gone from the list it reads again
        await self._etcd(lambda: retrying(run, REMOVE_TIMEOUT))

    async def _promote_a_client(self, removed: str) -> None:
        """After a removal: while the members are fewer than the cluster's voters, ask
        one client (reachable, the first by name) to become one."""
        members = len([m async for m in self.client.members()])
        if not blocks.is_voter(members, await blocks.load_settings(self.client)):
            return
        clients = sorted(
            (
                r
                for r in self.membership.live().values()
                if not r.etcd_member and r.reachable and r.id != removed
            ),
            key=lambda r: (r.name, r.id),
        )
        if clients:
            chosen = clients[0].id
            await self._change_settings(chosen, lambda s: msgspec_replace(s, voter=True))
            log.info(
                "the members are fewer than the voters after node %s left: node %s is asked "
                "to become one",
                removed,
                chosen,
            )


async def change_members(call: Callable[[], Awaitable[object]]) -> None:
    """An etcd membership change (member add or remove). etcd refuses one while a member
    is not yet connected long enough to count, as just after it was added or restarted
    ("unhealthy cluster"): tried again until then."""
    deadline = time.monotonic() + MEMBER_ADD_TIMEOUT
    while True:
        try:
            await call()
            return
        except aetcd.ClientError as exc:
            if "unhealthy" not in str(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


def msgspec_replace(value: T, **changes: Any) -> T:
    return msgspec.structs.replace(value, **changes)  # type: ignore[type-var]


# ------------------------------------------------------------ turning a lone node into a member


class Switch(Protocol):
    """What :class:`NodeControl` needs of the daemon: pause the reconcile loop and
    hand it a new store and context."""

    @property
    def sqlite(self) -> Store | None: ...

    @property
    def cluster(self) -> ClusterContext | None: ...

    async def pause(self) -> None: ...

    async def resume(self, cluster: ClusterContext | None) -> None: ...


class NodeControl:
    """Scheduler1's node methods, over the daemon's :class:`Switch`."""

    def __init__(self, paths: Paths, daemon: Switch) -> None:
        self.paths = paths
        self.daemon = daemon
        self._busy = asyncio.Lock()

    @property
    def files(self) -> pki.ClusterFiles:
        return pki.ClusterFiles.of(self.paths)

    async def _context(self) -> ClusterContext:
        if self.daemon.cluster is None:
            # In a thread: a node command may come while schedd waits for etcd.
            raise await asyncio.to_thread(cluster_config.why_no_cluster, self.paths)
        return self.daemon.cluster

    async def _lone(self) -> None:
        found = await asyncio.to_thread(cluster_config.load, self.paths)
        if found is not None or self.daemon.cluster is not None:
            node = found.node_id if found is not None else self.daemon.cluster.node_id  # type: ignore[union-attr]
            raise AlreadyExistsError(
                f"this node is already in a cluster (as node {node}); "
                "remove it from the cluster (zlayerctl node rm on another node) first"
            )

    def _fresh_start(self, member_dir: Path) -> None:
        """Blocking: what a failed init or join before this one left (no cluster.toml
        names it): its cluster files and its member's data, which would rejoin an
        old cluster."""
        shutil.rmtree(self.files.directory, ignore_errors=True)
        shutil.rmtree(member_dir, ignore_errors=True)

    def _member(
        self, node_id: str, advertise: str, initial: dict[str, str], state: str
    ) -> EtcdMemberConfig:
        return member_config(self.paths, node_id, advertise, initial, state)

    async def _start_member(self, config: ClusterConfig) -> None:
        await sync_member(self.paths)
        await wait_healthy(
            [_local_url(config)], ETCD_START_TIMEOUT, tls_of(pki.ClusterFiles(Path(config.files)))
        )

    async def _undo(self) -> None:
        """A failed init or join: back to a lone node (its etcd member stopped)."""
        await asyncio.to_thread(cluster_config.remove, self.paths)
        with contextlib.suppress(ZLayerError):
            await sync_member(self.paths)

    async def _address(self, advertise: str) -> str:
        return advertise.strip() or await asyncio.to_thread(default_address)

    async def init(self, argument: str) -> NodeRecord:
        async with self._busy:
            await self._lone()
            options = cluster_blocks.parse_init(argument)
            plan = await cluster_blocks.plan_init(_overlay(), options)
            address = await self._address(options.advertise)
            node_id = new_node_id()
            member_dir = self.paths.state_dir / "etcd"
            files = self.files

            def make() -> None:
                self._fresh_start(member_dir)
                pki.init_cluster(files, node_id, [address])
                secretkey.make(files)  # what every node seals the cluster's secrets with

            try:
                await asyncio.to_thread(make)
            except (pki.PkiError, secretkey.SecretsKeyError) as exc:
                raise InvalidArgumentError(str(exc)) from None
            member = self._member(node_id, address, {}, "new")
            member = msgspec_replace(member, cluster_token=f"zlayer-{secrets.token_hex(8)}")
            config = ClusterConfig(
                node_id=node_id,
                name=socket.gethostname(),
                advertise=address,
                etcd_endpoints=[_url(address, cluster_config.ETCD_CLIENT_PORT)],
                files=str(files.directory),
                block=plan.block,
                etcd=member,
            )
            await asyncio.to_thread(cluster_config.save, self.paths, config)
            paused = False
            try:
                await self._start_member(config)
                await cluster_blocks.record_init(
                    config.etcd_endpoints, tls_of(files), node_id, plan
                )
                await cluster_blocks.move_network(self.paths, _overlay(), plan.block)
                await self.daemon.pause()
                paused = True
                store = EtcdStore(config.etcd_endpoints, tls_of(files))
                sqlite = self.daemon.sqlite
                try:
                    if sqlite is not None:
                        moved = await asyncio.to_thread(move_to_etcd, sqlite, store)
                        log.info("node init moved %d keys of schedd's state into etcd", moved)
                    await self._reseal(store)
                except BaseException:
                    await asyncio.to_thread(store.close)
                    raise
                context = await ClusterContext.open(config, self.paths, store)
            except (MoveRefusedError, NodeKeyError, secretkey.SecretsKeyError) as exc:
                await self._failed(paused)
                raise ZLayerError(str(exc)) from None
            except BaseException:
                await self._failed(paused)
                raise
            await self.daemon.resume(context)
            return context.membership.record

    async def _reseal(self, store: EtcdStore) -> None:
        """The lone node's secrets, now in etcd, sealed again with the cluster's key, so
        every node that joins opens them (the node's own key never leaves it)."""
        node_key = await asyncio.to_thread(lambda: NodeKey.load(self.paths).secrets_key())
        cluster_key = await asyncio.to_thread(secretkey.load, self.files)
        done = await asyncio.to_thread(
            reseal, store, SealingKey.node(node_key), SealingKey.cluster(cluster_key)
        )
        log.info("node init sealed %d secrets again with the cluster's key", done.resealed)
        if done.left:
            log.warning(
                "node init left %d secrets that did not open with the node key (unreadable "
                "before; set them again): %s",
                len(done.left),
                ", ".join(done.left),
            )

    async def _failed(self, paused: bool) -> None:
        await self._undo()
        if paused:
            await self.daemon.resume(None)

    async def join(self, token_text: str, advertise: str) -> NodeRecord:
        async with self._busy:
            await self._lone()
            try:
                token = jointoken.parse(token_text)
            except jointoken.JoinTokenError as exc:
                raise InvalidArgumentError(str(exc)) from None
            sqlite = self.daemon.sqlite
            names = await asyncio.to_thread(sqlite.names) if sqlite is not None else []
            if names:
                raise InvalidArgumentError(
                    f"this node has deployments of its own ({', '.join(sorted(names))}); "
                    "a node that joins takes the cluster's: remove them (zlayerctl down) first"
                )
            await cluster_blocks.refuse_replicas(_overlay())
            address = await self._address(advertise)
            node_id = new_node_id()
            member_dir = self.paths.state_dir / "etcd"
            await asyncio.to_thread(self._fresh_start, member_dir)
            try:
                joined = await peer.join(token, node_id, [address])
            except peer.PeerError as exc:
                raise InvalidArgumentError(str(exc)) from None
            files = self.files
            await asyncio.to_thread(joined.write, files)
            tls = tls_of(files)
            endpoints = list(joined.etcd_endpoints)
            nat = nat_seen(address, joined.source_address)
            paused = False
            try:
                block = await cluster_blocks.join_block(endpoints, tls, node_id)
                if nat:
                    log.warning("node %s %s", node_id, nat)
                    await _keep_nat_seen(endpoints, tls, node_id, nat)
                member, endpoints = await self._maybe_voter(
                    node_id, address, endpoints, tls, client_only=bool(nat)
                )
                config = ClusterConfig(
                    node_id=node_id,
                    name=socket.gethostname(),
                    advertise=address,
                    etcd_endpoints=endpoints,
                    files=str(files.directory),
                    block=block,
                    etcd=member,
                )
                await asyncio.to_thread(cluster_config.save, self.paths, config)
                if member is not None:
                    await self._start_member(config)
                if block:
                    await cluster_blocks.move_network(self.paths, _overlay(), block)
                await self.daemon.pause()
                paused = True
                context = await ClusterContext.open(config, self.paths)
            except BaseException:
                await cluster_blocks.release_block(endpoints, tls, node_id)
                await self._failed(paused)
                raise
            await self.daemon.resume(context)
            return context.membership.record

    async def _maybe_voter(
        self,
        node_id: str,
        address: str,
        endpoints: list[str],
        tls: TLSFiles,
        client_only: bool = False,
    ) -> tuple[EtcdMemberConfig | None, list[str]]:
        """Add this node as an etcd member while the cluster has fewer than its voters:
        its member config (None: a client only) and the endpoints to use. A node
        behind NAT is a client only: the members could not reach its peer URL."""
        if client_only or (await asyncio.to_thread(schedd_settings, self.paths)).behind_nat:
            return None, endpoints
        etcd = cluster_client(endpoints, tls, timeout=10.0)
        try:
            members = [m async for m in etcd.members()]
            if not blocks.is_voter(len(members), await blocks.load_settings(etcd)):
                # all the voters' client URLs: a client outlives any one voter's loss
                return None, await cluster_blocks.member_endpoints(etcd) or endpoints
            peer_url = _url(address, cluster_config.ETCD_PEER_PORT)
            await self._add_member(etcd, peer_url)
            initial = {m.name: ",".join(m.peer_urls) for m in members if m.name}
            member = self._member(node_id, address, initial, "existing")
            # the cluster's token is what its first member was started with; a member
            # that joins an existing cluster ignores it, so any value will do
            own = _url(address, cluster_config.ETCD_CLIENT_PORT)
            return member, [*endpoints, own] if own not in endpoints else endpoints
        except (aetcd.ClientError, OSError, TimeoutError) as exc:
            raise _etcd_unreachable(endpoints, exc) from None
        finally:
            with contextlib.suppress(*ETCD_ERRORS):
                await etcd.close()

    @staticmethod
    async def _add_member(etcd: Client, peer_url: str) -> None:
        await change_members(lambda: etcd.add_member([peer_url]))

    async def join_token(self, ttl: float) -> str:
        cluster = await self._context()
        return await cluster.join_token(ttl)

    async def list_nodes(self) -> NodeList:
        cluster = await self._context()
        return cluster.list_nodes()

    async def label(self, node: str, labels: dict[str, str], remove: list[str]) -> NodeSettings:
        cluster = await self._context()
        return await cluster.label(node, labels, remove)

    async def drain(self, node: str) -> NodeSettings:
        cluster = await self._context()
        return await cluster.drain(node)

    async def undrain(self, node: str) -> NodeSettings:
        cluster = await self._context()
        return await cluster.undrain(node)

    async def remove(self, node: str) -> None:
        cluster = await self._context()
        await cluster.remove(node)

    async def rotate_mesh_key(self) -> NodeRecord:
        cluster = await self._context()
        return await cluster.rotate_mesh_key()


async def _keep_nat_seen(endpoints: list[str], tls: TLSFiles, node_id: str, nat: str) -> None:
    """The NAT a join showed, kept in the node's settings (no lease): its record says so
    at every start, not only the first."""
    etcd = cluster_client(endpoints, tls, timeout=10.0)
    try:
        wanted = NodeSettings(reachability=nat)
        await etcd.put(_settings_key(node_id), encode(wanted).encode())
    except ETCD_ERRORS as exc:
        raise _etcd_unreachable(endpoints, exc) from None
    finally:
        with contextlib.suppress(*ETCD_ERRORS):
            await etcd.close()


def _etcd_unreachable(endpoints: list[str], exc: BaseException) -> UnavailableError:
    return UnavailableError(
        f"cannot reach the cluster's etcd at {', '.join(endpoints)} "
        f"({exc or type(exc).__name__}); check that this node reaches those addresses"
    )


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("leaving the cluster failed: %r", task.exception())


def set_aside(path: Path) -> None:
    """Blocking: a SQLite store (and its WAL files) renamed out of the way."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        found = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            found.rename(found.with_name(f"{found.name}.before-cluster-{stamp}"))
