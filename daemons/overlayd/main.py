"""Entry point and bus object of zlayer-overlayd.

The bus members translate between D-Bus and
:class:`~daemons.overlayd.network.NodeNetwork`, which does the netlink and
nft work in a worker thread, one operation at a time. The daemon also
serves service DNS (:mod:`daemons.overlayd.dns`) on the gateway address and
probes kernel-path backends that have a stream health check
(:mod:`daemons.overlayd.publish`). In a cluster it carries the encrypted mesh
to the other nodes (:mod:`daemons.overlayd.mesh`: EnableMesh, GetMesh,
RotateMeshKey, and the WireGuard keys in the traffic view's peer blocks).

``zlayer-overlayd --remove-network`` (with the daemon stopped) removes what
overlayd made on this node: every attachment, the nft table with its
published ports, the persisted traffic, the mesh interface (stopping its
wireguard-go) with its key, and the bridge, and puts back the
host settings it changed (IPv4 forwarding) to the values it found.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sdbus import dbus_method_async_override

from daemons.overlayd import nft
from daemons.overlayd.dns import DnsServer, Zone
from daemons.overlayd.ipam import IpamError
from daemons.overlayd.mesh import Mesh
from daemons.overlayd.network import AttachError, NodeNetwork, SetupError
from daemons.overlayd.publish import (
    PortConflictError,
    ProbeKey,
    Prober,
    parse_traffic,
    published_ports,
)
from daemons.overlayd.settings import OverlaySettings
from shared.bus import (
    DAEMONS_BY_NAME,
    ConflictError,
    InvalidArgumentError,
    Overlay1,
    UnavailableError,
)
from shared.config import ConfigError
from shared.daemon import EX_CONFIG, Daemon, daemon_members, main_for
from shared.logs import setup_logging
from shared.mesh.device import MeshError
from shared.paths import Paths
from shared.tasks import cancel_all
from shared.traffic import TrafficError
from shared.views import TrafficHolder
from shared.wire import decode, encode
from shared.wire.agent import SyncResult
from shared.wire.mesh import MeshStatus
from shared.wire.traffic import DeploymentTraffic, PeerBlock, TrafficViews

if TYPE_CHECKING:
    from shared.wire.overlay import Attachment

ALLOCATIONS = Gauge("zlayer_overlay_allocations", "Addresses of the node subnet in use.")
ATTACHES = Counter("zlayer_overlay_attaches", "Attach calls, by result.", ["result"])
DETACHES = Counter("zlayer_overlay_detaches", "Detach calls that removed a network.")
PUBLISHED = Gauge("zlayer_overlay_published_ports", "Node ports on the kernel L4 path.")
PUSHES = Counter("zlayer_overlay_traffic_pushes", "SetTraffic calls, by result.", ["result"])
MESH_CHECK_INTERVAL = 5.0  # seconds between looks at the mesh interface


class MeshCollector:
    """The mesh's peers, read from the WireGuard device when Prometheus scrapes.

    Scrapes are served in the metrics thread, so the device's answer (a
    local socket or netlink round trip) never waits on the event loop.
    """

    def __init__(self) -> None:
        self.mesh: Mesh | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        mesh = self.mesh
        device = mesh.device if mesh is not None else None
        peers = GaugeMetricFamily("zlayer_overlayd_mesh_peers", "WireGuard peers of the mesh.")
        handshake = GaugeMetricFamily(
            "zlayer_overlayd_mesh_peer_last_handshake_seconds",
            "Unix time of a mesh peer's last handshake (0: never).",
            labels=["peer"],
        )
        received = CounterMetricFamily(
            "zlayer_overlayd_mesh_peer_received_bytes",
            "Bytes received from a mesh peer (since its interface started).",
            labels=["peer"],
        )
        sent = CounterMetricFamily(
            "zlayer_overlayd_mesh_peer_transmitted_bytes",
            "Bytes sent to a mesh peer (since its interface started).",
            labels=["peer"],
        )
        if mesh is not None and device is not None:
            try:
                held = device.get()
            except MeshError:
                held = None
            if held is not None:
                peers.add_metric([], len(held.peers))
                for peer in held.peers:
                    name = mesh.node_of(peer.public_key)
                    handshake.add_metric([name], peer.last_handshake)
                    received.add_metric([name], peer.rx_bytes)
                    sent.add_metric([name], peer.tx_bytes)
        else:
            peers.add_metric([], 0)
        yield from (peers, handshake, received, sent)


MESH_METRICS = MeshCollector()
REGISTRY.register(MESH_METRICS)

T = TypeVar("T")


def parse_bus_traffic(deployment: str, text: str) -> DeploymentTraffic:
    """A pushed view, or the bus error that says why it is not one."""
    try:
        return parse_traffic(deployment, text)
    except TrafficError as exc:
        PUSHES.labels(result="invalid").inc()
        raise InvalidArgumentError(str(exc)) from None


class OverlayService(Overlay1):
    version, status = daemon_members()

    def __init__(self, daemon: OverlayDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    @dbus_method_async_override()
    async def attach(self, container_id: str, hostname: str) -> str:
        try:
            attachment = await self._network_of(self.daemon.network.attach, container_id, hostname)
        except UnavailableError:
            ATTACHES.labels(result="failed").inc()
            raise
        ATTACHES.labels(result="ok").inc()
        return encode(attachment)

    @dbus_method_async_override()
    async def reserve(self, container_id: str, hostname: str) -> str:
        return encode(await self._network_of(self.daemon.network.reserve, container_id, hostname))

    async def _network_of(
        self, make: Callable[[str, str], Attachment], container_id: str, hostname: str
    ) -> Attachment:
        """``make`` (the network's attach or reserve) in overlayd's worker; its failure
        as one sentence on the bus."""
        if not container_id:
            raise InvalidArgumentError("a container id is needed to attach a network")
        try:
            return await self.daemon.work(make, container_id, hostname)
        except AttachError as exc:
            raise UnavailableError(str(exc)) from None
        except Exception as exc:
            self.daemon.log.exception("attaching %s failed", container_id)
            raise UnavailableError(f"cannot attach {container_id} to the network: {exc}") from None

    @dbus_method_async_override()
    async def detach(self, container_id: str) -> None:
        try:
            removed = await self.daemon.work(self.daemon.network.detach, container_id)
        except Exception as exc:
            self.daemon.log.exception("detaching %s failed", container_id)
            raise UnavailableError(f"cannot detach {container_id}: {exc}") from None
        if removed:
            DETACHES.inc()
            self.daemon.log.info("detached %s", container_id)

    @dbus_method_async_override()
    async def list_attachments(self) -> str:
        return encode(self.daemon.network.attachments())

    @dbus_method_async_override()
    async def get_network(self) -> str:
        return encode(self.daemon.network.info())

    @dbus_method_async_override()
    async def set_traffic(self, deployment: str, traffic: str) -> None:
        await self.daemon.push_traffic(parse_bus_traffic(deployment, traffic))

    @dbus_method_async_override()
    async def sync_traffic(self, views: str) -> str:
        return encode(await self.daemon.sync_traffic(views))

    @dbus_method_async_override()
    async def list_records(self) -> str:
        return encode(self.daemon.zone.records())

    @dbus_method_async_override()
    async def enable_mesh(self, listen_port: int) -> str:
        if not 1 <= listen_port <= 65535:
            raise InvalidArgumentError("the mesh's listen port is a number from 1 to 65535")
        return encode(await self.daemon.enable_mesh(listen_port))

    @dbus_method_async_override()
    async def get_mesh(self) -> str:
        return encode(await self.daemon.mesh_status())

    @dbus_method_async_override()
    async def rotate_mesh_key(self) -> str:
        return encode(await self.daemon.rotate_mesh_key())


class OverlayDaemon(Daemon):
    info = DAEMONS_BY_NAME["overlayd"]
    settings_class = OverlaySettings
    holds_view = True

    def __init__(self, settings: OverlaySettings, paths: Paths) -> None:
        super().__init__(settings, paths)
        # pyroute2 logs every netlink message at debug level: too much even for debugging.
        logging.getLogger("pyroute2").setLevel(logging.WARNING)
        self.network = NodeNetwork(
            settings, paths.daemon_state(self.info.name), on_change=self._update_metrics
        )
        self._lock = asyncio.Lock()
        self._traffic_lock = asyncio.Lock()
        self.views = TrafficHolder(paths.daemon_state(self.info.name), self.log)
        self.zone = Zone()
        self.dns_server: DnsServer | None = None
        self.prober = Prober(settings.stream_probe_interval, self._backends_changed)
        self._tasks: list[asyncio.Task[None]] = []
        MESH_METRICS.mesh = self.network.mesh

    def make_service(self) -> OverlayService:
        return OverlayService(self)

    async def work(self, func: Callable[..., T], *args: object) -> T:
        """Run blocking network work in a thread, one operation at a time."""
        async with self._lock:
            return await asyncio.to_thread(func, *args)

    async def start(self) -> None:
        network = self.network
        try:
            await self.work(network.load)
            for step in await self.work(network.setup):
                self.log.info("%s", step)
            repaired = await self.work(network.reconcile)
        except SetupError as exc:
            self.log.error("%s", exc)
            raise SystemExit(EX_CONFIG if exc.config else 1) from None
        except IpamError as exc:  # the subnet setting; an unreadable file is moved aside
            self.log.error("%s", exc)
            raise SystemExit(EX_CONFIG) from None
        for line in repaired:
            self.log.warning("%s", line)
        for traffic in network.traffic.values():
            self.zone.set(traffic)
        for deployment, ports in network.published.items():
            self.prober.set_ports(deployment, ports)
        PUBLISHED.set(len(network.published_ports()))
        dns_port = self.settings_dns_port
        settings = self.settings
        assert isinstance(settings, OverlaySettings)
        self.dns_server = DnsServer(
            self.zone,
            network.upstreams,
            max_in_flight=settings.dns_max_in_flight,
            max_tcp_connections=settings.dns_max_tcp_connections,
        )
        try:
            await self.dns_server.start(str(network.gateway), dns_port)
        except OSError as exc:
            self.log.error(
                "cannot serve service DNS on %s port %d (%s); free the port or set dns_port in %s",
                network.gateway,
                dns_port,
                exc.strerror or exc,
                self.paths.daemon_config(self.info.name),
            )
            raise SystemExit(1) from None
        self.prober.start()
        self._tasks.append(asyncio.create_task(self._watch_mesh(), name="mesh"))
        self.detail = (
            f"bridge {network.bridge} {network.gateway}/{network.subnet.prefixlen}, "
            f"{len(network.ipam)} attached"
        )
        self.log.info(
            "node network: bridge %s, subnet %s, gateway %s, nft table ip %s, "
            "%d attachments (%d repaired), service DNS on port %d forwarding to %s, "
            "%d deployments' traffic, %d published ports",
            network.bridge,
            network.subnet,
            network.gateway,
            network.table,
            len(network.ipam),
            len(repaired),
            dns_port,
            ", ".join(str(u) for u in network.upstreams) or "nothing",
            len(network.traffic),
            len(network.published_ports()),
        )

    @property
    def settings_dns_port(self) -> int:
        settings = self.settings
        assert isinstance(settings, OverlaySettings)
        return settings.dns_port

    async def push_traffic(self, traffic: DeploymentTraffic) -> None:
        """Publish, persist, then answer DNS from one deployment's view (one at a time).

        Raises the bus error that names why the view cannot be applied.
        """
        deployment = traffic.deployment
        try:
            await self._apply_traffic(traffic)
        except PortConflictError as exc:
            PUSHES.labels(result="conflict").inc()
            raise ConflictError(str(exc)) from None
        except nft.NftError as exc:
            PUSHES.labels(result="failed").inc()
            raise UnavailableError(f"cannot publish the ports of {deployment}: {exc}") from None
        except OSError as exc:
            PUSHES.labels(result="failed").inc()
            self.log.exception("keeping the traffic of %s failed", deployment)
            raise UnavailableError(f"cannot keep the traffic of {deployment}: {exc}") from None
        PUSHES.labels(result="ok").inc()

    async def sync_traffic(self, text: str) -> SyncResult:
        """schedd's complete view: apply every deployment, remove the ones it no longer names."""

        async def apply_one(deployment: str, view: DeploymentTraffic) -> None:
            await self.push_traffic(parse_bus_traffic(deployment, encode(view)))

        result = await self.views.sync(text, lambda: self.network.traffic, apply_one)
        if result.accepted:
            await self._set_peers(decode(text, TrafficViews).peers)
        return result

    async def _set_peers(self, peers: list[PeerBlock]) -> None:
        """In a cluster: routes to the other nodes' blocks, and the bridge lets them in."""
        try:
            changed = await self.work(self.network.set_peers, peers)
        except (nft.NftError, OSError) as exc:
            self.log.error("cannot route to the cluster's other nodes: %s", exc)
            return
        for line in changed:
            self.log.info("%s", line)

    # ------------------------------------------------------------ the mesh

    async def enable_mesh(self, listen_port: int) -> MeshStatus:
        try:
            done = await self.work(self.network.enable_mesh, listen_port)
            status = await self.work(self.network.mesh.status)
        except MeshError as exc:
            raise UnavailableError(str(exc)) from None
        except (nft.NftError, OSError) as exc:
            self.log.exception("turning the mesh on failed")
            raise UnavailableError(f"cannot turn the mesh on: {exc}") from None
        for line in done:
            self.log.info("%s", line)
        self.log.info(
            "mesh on: %s (%s), port %d, public key %s",
            status.interface,
            status.implementation,
            status.listen_port,
            status.public_key,
        )
        return status

    async def mesh_status(self) -> MeshStatus:
        try:
            # Not under the work lock: a read of the device must not wait for a push.
            return await asyncio.to_thread(self.network.mesh.status)
        except MeshError as exc:
            raise UnavailableError(str(exc)) from None

    async def rotate_mesh_key(self) -> MeshStatus:
        try:
            public = await self.work(self.network.mesh.rotate)
            status = await self.work(self.network.mesh.status)
        except MeshError as exc:
            raise UnavailableError(str(exc)) from None
        self.log.info("mesh key rotated; the new public key is %s", public)
        return status

    async def _watch_mesh(self) -> None:
        """Bring the mesh back if its interface goes (a killed wireguard-go)."""
        said = ""
        while True:
            await asyncio.sleep(MESH_CHECK_INTERVAL)
            try:
                done = await self.work(self.network.check_mesh)
            except (MeshError, nft.NftError, OSError) as exc:
                if str(exc) != said:  # once per reason, not every few seconds
                    self.log.error("the mesh is down: %s", exc)
                    said = str(exc)
                continue
            said = ""
            for line in done:
                self.log.warning("mesh repaired: %s", line)

    async def _apply_traffic(self, traffic: DeploymentTraffic) -> None:
        deployment = traffic.deployment
        ports = published_ports(traffic)
        if not traffic.services:
            ports = []
        async with self._traffic_lock:
            down = self.prober.down_for(deployment, ports)
            await self.work(self.network.set_traffic, traffic, ports, down)
            self.prober.set_ports(deployment, ports)
            self.zone.set(traffic)
        PUBLISHED.set(len(self.network.published_ports()))
        names = sum(len(s.backends) for s in traffic.services)
        self.log.info(
            "traffic of %s: %d services, %d backends, %s",
            deployment,
            len(traffic.services),
            names,
            ", ".join(f"{p.describe()} -> {len(p.targets)}" for p in ports) or "no published port",
        )

    async def _backends_changed(self, deployment: str, _down: frozenset[ProbeKey]) -> None:
        async with self._traffic_lock:
            if deployment not in self.network.published:
                return
            # Read again under the lock: a push may have changed it meanwhile.
            down = self.prober.down.get(deployment, frozenset())
            try:
                await self.work(self.network.set_down, deployment, down)
            except nft.NftError as exc:
                self.log.error("cannot update the published ports of %s: %s", deployment, exc)

    async def stop(self) -> None:
        # Attachments, the bridge, the table and the mesh interface stay:
        # replicas keep their network (and published ports their rules)
        # while overlayd restarts.
        await cancel_all(self._tasks)
        await self.prober.stop()
        if self.dns_server is not None:
            await self.dns_server.stop()
        async with self._lock:
            pass

    def _update_metrics(self) -> None:
        count = len(self.network.ipam)
        ALLOCATIONS.set(count)
        network = self.network
        self.detail = (
            f"bridge {network.bridge} {network.gateway}/{network.subnet.prefixlen}, "
            f"{count} attached"
        )


def remove_network(paths: Paths) -> int:
    """``--remove-network``: tear down what overlayd made; the exit code."""
    log = logging.getLogger("zlayer.overlayd")
    try:
        settings = OverlaySettings.load("overlayd", paths)
    except ConfigError as exc:
        setup_logging("zlayer-overlayd")
        log.error("%s", exc)
        return EX_CONFIG
    setup_logging("zlayer-overlayd", settings.log_level)
    network = NodeNetwork(settings, paths.daemon_state("overlayd"))
    try:
        network.load()
    except IpamError as exc:
        log.warning("%s; removing only the bridge and table", exc)
    try:
        removed = network.remove_all()
    except Exception as exc:
        log.error("could not remove the node network: %s", exc)
        return 1
    log.info("removed %s", ", ".join(removed) if removed else "nothing (no network was there)")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="zlayer-overlayd", description="ZLayer node networking daemon (org.zlayer.Overlay1)."
    )
    parser.add_argument(
        "--remove-network",
        action="store_true",
        help="remove every attachment, the nft table and the bridge, put back the host "
        "settings overlayd changed, then exit "
        "(stop the daemon first)",
    )
    args = parser.parse_args()
    if args.remove_network:
        sys.exit(remove_network(Paths.from_env()))
    main_for(OverlayDaemon)
