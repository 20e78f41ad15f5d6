"""The node network as one object: settings, IPAM, bridge, nftables, attachments, ports.

:class:`NodeNetwork` is blocking and not thread-safe by design: the daemon
runs each call in a worker thread, one at a time (an asyncio lock), so the
event loop keeps serving the bus while netlink and nft work.

It persists the allocations (``allocations.json`` in overlayd's state
directory) and the last traffic pushed for each deployment
(``traffic/<deployment>.json``); everything else (bridge, table with its
published ports, namespaces, veths) is rebuilt or repaired from them on
start, which is what lets overlayd restart while replicas keep running.
Each file is written with :mod:`shared.statefile`; one that cannot be read
is moved aside, and the allocations are taken back from the attachments on
the node (their veths are labelled with the container id).

The host settings overlayd changes (IPv4 forwarding, the bridge's
route_localnet) are recorded in ``sysctls.json`` with the value found before
the first change, and :meth:`NodeNetwork.remove_all` puts them back.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from daemons.overlayd import nft, plumbing
from daemons.overlayd.dns import DOMAIN, Upstream, parse_upstream
from daemons.overlayd.ipam import Allocation, ExhaustedError, Ipam
from daemons.overlayd.mesh import Mesh
from daemons.overlayd.plumbing import IFACE, Names
from daemons.overlayd.publish import (
    ProbeKey,
    PublishedPort,
    check_conflicts,
    published_ports,
)
from daemons.overlayd.settings import OverlaySettings, host_resolvers
from shared.mesh.device import MeshError
from shared.statefile import StateFormatError, read_state, remove_leftovers, write_atomically
from shared.traffic import TrafficError
from shared.wire import decode, encode
from shared.wire.overlay import Attachment, NetworkInfo
from shared.wire.traffic import DeploymentTraffic, PeerBlock

STATE_FILE = "allocations.json"
TRAFFIC_DIR = "traffic"
SYSCTL_FILE = "sysctls.json"
HOST_RESOLV = Path("/etc/resolv.conf")

log = logging.getLogger("zlayer.overlayd")


class SetupError(Exception):
    """The node network cannot be set up, in one sentence; ``config`` if the settings are why."""

    def __init__(self, message: str, config: bool = False) -> None:
        super().__init__(message)
        self.config = config


class AttachError(Exception):
    """An Attach that could not be done, in one sentence."""


def names_of(allocation: Allocation, bridge: str) -> Names:
    """The names recorded with an allocation (derived ones if it predates them)."""
    derived = plumbing.names_for(bridge, allocation.container_id)
    if not allocation.host_veth or not allocation.netns:
        return derived
    return Names(
        netns=allocation.netns,
        host_veth=allocation.host_veth,
        peer="zlp" + allocation.host_veth[3:],
    )


class NodeNetwork:
    def __init__(
        self,
        settings: OverlaySettings,
        state_dir: Path,
        resolv_conf: Path = HOST_RESOLV,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.bridge = settings.bridge
        self.subnet = settings.subnet
        self.table = settings.table
        self.state_path = state_dir / STATE_FILE
        self.traffic_dir = state_dir / TRAFFIC_DIR
        self.sysctl_path = state_dir / SYSCTL_FILE
        self.resolv_conf = resolv_conf
        self.ipam = Ipam(self.subnet)
        self.gateway = self.ipam.gateway
        # Replicas resolve through the service DNS on the gateway; it
        # forwards other names to ``upstreams``.
        self.dns: list[str] = [str(self.gateway)]
        self.search: list[str] = [DOMAIN]
        self.upstreams: list[Upstream] = []
        self.traffic: dict[str, DeploymentTraffic] = {}
        self.published: dict[str, list[PublishedPort]] = {}
        self.down: dict[str, frozenset[ProbeKey]] = {}
        # In a cluster: the other nodes' blocks, routed via those nodes (schedd's view).
        self.peer_blocks: list[PeerBlock] = []
        self.peers: nft.Peers = ((), ())
        # The cluster's encrypted mesh: blocks with a WireGuard key go through it.
        self.mesh = Mesh(self.bridge, self.gateway, self.subnet, state_dir)
        self._on_change = on_change or (lambda: None)
        # Namespaces reserve() made that attach() has not filled yet (this run's only).
        self._empty_netns: set[str] = set()

    # ------------------------------------------------------------ start

    def load(self) -> None:
        """Read the persisted allocations, then the persisted traffic."""
        self.ipam = Ipam.load(self.subnet, self.state_path)
        self.load_traffic()
        self.mesh.load()

    def load_traffic(self) -> list[str]:
        """Read each deployment's last pushed traffic; what was skipped, for the log."""
        skipped: list[str] = []
        self.traffic.clear()
        self.published.clear()
        if not self.traffic_dir.is_dir():
            return skipped
        remove_leftovers(self.traffic_dir)  # writes cut short by a crash
        for path in sorted(self.traffic_dir.glob("*.json")):
            traffic = read_state(
                path, lambda text: decode(text, DeploymentTraffic), "the next push replaces it", log
            )
            if traffic is None:
                continue
            try:
                ports = published_ports(traffic)
                check_conflicts(traffic.deployment, ports, self.published)
            except TrafficError as exc:
                line = " ".join(str(exc).split())[:200]
                skipped.append(f"skipped {path.name} ({line}); the next push replaces it")
                log.warning("%s", skipped[-1])
                continue
            self.traffic[traffic.deployment] = traffic
            if ports:
                self.published[traffic.deployment] = ports
        return skipped

    def setup(self) -> list[str]:
        """Bridge, forwarding and NAT; the resolvers replicas get. What was done, for the log."""
        done: list[str] = []
        self._read_resolvers()
        conflicts = plumbing.conflicting_addresses(self.subnet, self.bridge, self.mesh.interface)
        if conflicts:
            raise SetupError(
                f"the subnet {self.subnet} overlaps {', '.join(conflicts)}; "
                "choose another subnet in overlayd.toml",
                config=True,
            )
        plumbing.prepare_netns_dir()
        try:
            done += plumbing.ensure_bridge(self.bridge, self.gateway, self.subnet.prefixlen)
        except plumbing.PlumbingError as exc:
            raise SetupError(str(exc), config=True) from None
        # Host-wide: the replicas' answers and published ports arrive on the
        # uplinks too, so forwarding cannot be kept to the bridge; the table's
        # forward chain drops what the node network does not allow.
        if self._set_sysctl(plumbing.IP_FORWARD, "1"):
            done.append("turned IPv4 forwarding on")
        # The node's own connections to 127.0.0.1:<published port> are
        # DNATed onto the bridge; the kernel drops 127/8 there unless told.
        # Only on the bridge (the setting is the OR of ``all`` and the
        # device's), so the rest of the host keeps treating 127/8 off
        # loopback as martian. The table's localnet chain drops whatever
        # else comes from the bridge to 127/8, so replicas cannot reach
        # services bound to the node's loopback (CVE-2020-8558).
        if self._set_sysctl(plumbing.route_localnet(self.bridge), "1"):
            done.append(f"let {self.bridge} carry 127.0.0.0/8 (published ports on localhost)")
        if self.mesh.state is not None and not self.peer_blocks:
            # Until schedd's next view: the blocks the mesh held stay let in and routed.
            self.peer_blocks = list(self.mesh.state.peers)
            held = sorted({b.subnet for b in self.peer_blocks})
            self.peers = (tuple(held), tuple(held))
        try:
            self._apply_table()
        except nft.NftError as exc:
            raise SetupError(str(exc)) from None
        if self.mesh.enabled:
            try:
                done += self.mesh.up()
            except (MeshError, OSError) as exc:
                # The node network works without it; GetMesh says why it is off.
                log.error("the mesh is down: %s", exc)
        return done

    def _set_sysctl(self, key: str, value: str) -> bool:
        """Set a host setting, first recording the value found (once); True if it changed."""
        found = plumbing.read_sysctl(key)
        if found == value:
            return False
        recorded = self._recorded_sysctls()
        if key not in recorded:
            # Before the change: a crash in between must not lose the old value,
            # and a later start (which finds overlayd's own value) records nothing.
            recorded[key] = found
            write_atomically(self.sysctl_path, json.dumps(recorded, indent=1) + "\n")
        plumbing.write_sysctl(key, value)
        return True

    def _recorded_sysctls(self) -> dict[str, str]:
        found = read_state(
            self.sysctl_path,
            _parse_sysctls,
            "the settings changed before are left as they are",
            log,
        )
        return found if found is not None else {}

    def restore_sysctls(self) -> list[str]:
        """Put back the host settings overlayd changed; what was done, for the log."""
        done: list[str] = []
        recorded = self._recorded_sysctls()
        others = plumbing.zlayer_bridges(exclude=self.bridge)
        for key, value in recorded.items():
            if not plumbing.sysctl_path(key).exists():
                continue  # a setting of an interface that is gone
            if key == plumbing.IP_FORWARD and others:
                done.append(
                    f"left {plumbing.sysctl_name(key)} on: the bridge {others[0]} still forwards"
                )
                continue
            if plumbing.read_sysctl(key) != value:
                plumbing.write_sysctl(key, value)
                done.append(f"{plumbing.sysctl_name(key)} (set back to {value})")
        self.sysctl_path.unlink(missing_ok=True)
        return done

    def _apply_table(self) -> None:
        nft.apply(
            self.table,
            self.bridge,
            self.subnet,
            gateway=self.gateway,
            dns_port=self.settings.dns_port,
            published=self.published,
            down=self.down,
            peers=self.peers,
            mesh=self.mesh.interface if self.mesh.enabled else "",
        )

    def _read_resolvers(self) -> None:
        host: tuple[list[str], list[str], list[str]] = ([], [], [])
        if self.settings.nameservers is None or self.settings.search_domains is None:
            try:
                host = host_resolvers(self.resolv_conf.read_text())
            except OSError as exc:
                log.warning("cannot read %s (%s); replicas get no resolvers", self.resolv_conf, exc)
        usable, skipped, search = host
        if self.settings.nameservers is None:
            # overlayd forwards from the host's own namespace, so the host's
            # loopback resolvers (systemd-resolved, dnsmasq) serve too;
            # link-local ones would need an interface, which resolv.conf
            # does not say.
            loopback = [a for a in skipped if not a.lower().startswith("fe80")]
            texts = loopback + usable
        else:
            texts = list(self.settings.nameservers)
        upstreams = [parse_upstream(text) for text in texts]
        own = Upstream(str(self.gateway), self.settings.dns_port)
        self.upstreams = [u for u in upstreams if u != own]
        if not self.upstreams:
            log.warning(
                "the host has no resolver to forward names outside %s to; "
                "set nameservers in overlayd.toml",
                DOMAIN,
            )
        domains = search if self.settings.search_domains is None else self.settings.search_domains
        self.search = [DOMAIN] + [d for d in domains if d.rstrip(".").lower() != DOMAIN]

    def reconcile(self) -> list[str]:
        """Match the persisted allocations with what exists; what was repaired."""
        repaired: list[str] = []
        for stale in self.ipam.dropped:
            gone = plumbing.unplumb(names_of(stale, self.bridge))
            repaired.append(
                f"dropped {stale.container_id} ({stale.address} is not in {self.subnet}); "
                f"removed {', '.join(gone) or 'nothing'}"
            )
        if self.ipam.dropped:
            self.ipam.dropped.clear()
            self.ipam.save()
        repaired += self._take_back_live()
        prefixlen = self.subnet.prefixlen
        for allocation in self.ipam.all():
            names = names_of(allocation, self.bridge)
            state = plumbing.inspect(names, self.bridge, allocation.address, prefixlen)
            if state.healthy:
                plumbing.set_label(names, _label(allocation))
                continue
            if not state.netns:
                plumbing.unplumb(names)
                self.ipam.release(allocation.container_id)
                repaired.append(
                    f"released {allocation.address} of {allocation.container_id}: "
                    f"its namespace {names.netns} is gone"
                )
                continue
            steps = plumbing.plumb(
                names, self.bridge, allocation.address, prefixlen, self.gateway, _label(allocation)
            )
            repaired.append(f"repaired {allocation.container_id}: {'; '.join(steps)}")
        self._on_change()
        return repaired

    def _take_back_live(self) -> list[str]:
        """Allocations for the attachments on the bridge that the state file does not hold
        (it was lost or unreadable), so their replicas keep their addresses."""
        taken: list[str] = []
        for live in plumbing.live_attachments(self.bridge):
            if not live.container_id or live.address is None:
                continue
            if self.ipam.get(live.container_id) is not None:
                continue
            allocation = Allocation(
                live.container_id,
                live.address,
                live.hostname,
                live.names.netns,
                live.names.host_veth,
            )
            if self.ipam.adopt(allocation):
                taken.append(f"took back {live.address} of {live.container_id} from its attachment")
        return taken

    # ------------------------------------------------------------ attachments

    def reserve(self, container_id: str, hostname: str) -> Attachment:
        """The container's address and its (empty) network namespace, made now; what
        :meth:`attach` would answer. The container can be created in the namespace
        while :meth:`attach` makes the rest (veth, address, route), before it starts."""
        allocation, fresh = self._allocation(container_id, hostname)
        names = names_of(allocation, self.bridge)
        if not names.netns_path.exists():
            try:
                plumbing.create_netns(names.netns_path)
            except Exception:
                if fresh:
                    self.ipam.release(container_id)
                raise
            self._empty_netns.add(container_id)
            self._on_change()
        return self._attachment(allocation)

    def attach(self, container_id: str, hostname: str) -> Attachment:
        allocation, fresh = self._allocation(container_id, hostname)
        names = names_of(allocation, self.bridge)
        # A namespace reserve() made and nothing has touched yet: no leftovers to seek.
        # Taken now: a failed attempt may have left something in it.
        empty_netns = container_id in self._empty_netns
        self._empty_netns.discard(container_id)
        try:
            plumbing.plumb(
                names,
                self.bridge,
                allocation.address,
                self.subnet.prefixlen,
                self.gateway,
                _label(allocation),
                empty_netns=empty_netns,
            )
        except Exception:
            if fresh:
                plumbing.unplumb(names)
                self.ipam.release(container_id)
            raise
        self._on_change()
        return self._attachment(allocation)

    def _allocation(self, container_id: str, hostname: str) -> tuple[Allocation, bool]:
        """The container's allocation, and whether it was made by this call."""
        if not container_id or "\n" in container_id:
            raise AttachError("a container id is needed to attach a network")
        allocation = self.ipam.get(container_id)
        if allocation is not None:
            return allocation, False
        names = plumbing.names_for(self.bridge, container_id)
        # Its network outlived a lost allocation: it keeps its address.
        found = plumbing.address_inside(names) if names.netns_path.exists() else None
        if found is not None:
            live = Allocation(container_id, found, hostname, names.netns, names.host_veth)
            if self.ipam.adopt(live):
                return live, False
        try:
            # Recorded before anything is created, so a crash in between
            # leaves a record that the next start repairs or releases.
            return self.ipam.allocate(container_id, hostname, names.netns, names.host_veth), True
        except ExhaustedError as exc:
            raise AttachError(str(exc)) from None

    def detach(self, container_id: str) -> bool:
        """Remove a container's network; False if it had none."""
        allocation = self.ipam.get(container_id)
        if allocation is None:
            names = plumbing.names_for(self.bridge, container_id)
        else:
            names = names_of(allocation, self.bridge)
        removed = plumbing.unplumb(names)
        self.ipam.release(container_id)
        self._empty_netns.discard(container_id)
        self._on_change()
        return allocation is not None or bool(removed)

    def attachments(self) -> list[Attachment]:
        return [self._attachment(a) for a in self.ipam.all()]

    def info(self) -> NetworkInfo:
        return NetworkInfo(
            bridge=self.bridge,
            subnet=str(self.subnet),
            gateway=str(self.gateway),
            allocations=len(self.ipam),
        )

    def _attachment(self, allocation: Allocation) -> Attachment:
        names = names_of(allocation, self.bridge)
        return Attachment(
            container_id=allocation.container_id,
            netns=str(names.netns_path),
            interface=IFACE,
            address=str(allocation.address),
            prefix_len=self.subnet.prefixlen,
            gateway=str(self.gateway),
            dns=self.dns,
            search=self.search,
            host_veth=names.host_veth,
            bridge=self.bridge,
        )

    # ------------------------------------------------------------ traffic

    def set_traffic(
        self,
        traffic: DeploymentTraffic,
        ports: list[PublishedPort],
        down: frozenset[ProbeKey] = frozenset(),
    ) -> None:
        """Publish one deployment's kernel-path ports (less ``down``) and keep its traffic.

        Raises PortConflictError (nothing changed) for a port another
        deployment holds, NftError if nft refused.
        """
        deployment = traffic.deployment
        check_conflicts(deployment, ports, self.published)
        published = dict(self.published)
        wanted_down = dict(self.down)
        if traffic.services and ports:
            published[deployment] = ports
        else:
            published.pop(deployment, None)
        if down and deployment in published:
            wanted_down[deployment] = down
        else:
            wanted_down.pop(deployment, None)
        if deployment in published or deployment in self.published:
            self._apply_deployment(deployment, published, wanted_down)
        self.published = published
        self.down = wanted_down
        if traffic.services:
            self._save_traffic(traffic)
            self.traffic[deployment] = traffic
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.traffic_dir / f"{deployment}.json").unlink()
            self.traffic.pop(deployment, None)

    def set_down(self, deployment: str, down: frozenset[ProbeKey]) -> None:
        """Take failing backends (by health probe) out of a deployment's maps."""
        wanted = dict(self.down)
        if down:
            wanted[deployment] = down
        else:
            wanted.pop(deployment, None)
        if deployment in self.published:
            self._apply_deployment(deployment, self.published, wanted)
        self.down = wanted

    def _apply_deployment(
        self,
        deployment: str,
        published: dict[str, list[PublishedPort]],
        down: dict[str, frozenset[ProbeKey]],
    ) -> None:
        text = nft.deployment_update(
            self.table,
            deployment,
            gateway=self.gateway,
            dns_port=self.settings.dns_port,
            published=published,
            down=down,
        )
        try:
            nft.run_transaction(text)
        except nft.NftError as exc:
            # The table was changed or removed behind overlayd's back:
            # rebuild all of it (one transaction too) from what it holds.
            log.warning("%s; rebuilding the table %s", exc, self.table)
            nft.apply(
                self.table,
                self.bridge,
                self.subnet,
                gateway=self.gateway,
                dns_port=self.settings.dns_port,
                published=published,
                down=down,
                peers=self.peers,
                mesh=self.mesh.interface if self.mesh.enabled else "",
            )

    def _save_traffic(self, traffic: DeploymentTraffic) -> None:
        # Not fsynced: schedd sends every view again when overlayd starts.
        write_atomically(
            self.traffic_dir / f"{traffic.deployment}.json", encode(traffic), durable=False
        )

    def published_ports(self) -> list[PublishedPort]:
        return [port for ports in self.published.values() for port in ports]

    # ------------------------------------------------------------ removal

    def remove_all(self) -> list[str]:
        """Every attachment, the nft table and the bridge; what was removed.

        The bridge and table outlive overlayd on purpose (replicas keep their
        network across restarts); this is for uninstalling and for tests.
        """
        removed: list[str] = []
        for allocation in self.ipam.all():
            removed += plumbing.unplumb(names_of(allocation, self.bridge))
            self.ipam.release(allocation.container_id)
        for stale in self.ipam.dropped:
            removed += plumbing.unplumb(names_of(stale, self.bridge))
        if self.ipam.dropped:
            self.ipam.dropped.clear()
            self.ipam.save()
        for live in plumbing.live_attachments(self.bridge):  # whatever no allocation named
            removed += plumbing.unplumb(live.names)
        if nft.remove(self.table):
            removed.append(f"nft table ip {self.table}")
        if self.traffic_dir.is_dir():
            for path in self.traffic_dir.iterdir():
                path.unlink()
            self.traffic_dir.rmdir()
            if self.traffic:
                removed.append(f"the traffic of {len(self.traffic)} deployments")
        self.traffic.clear()
        self.published.clear()
        removed += plumbing.set_peer_routes({})
        try:
            removed += self.mesh.down()
        except (MeshError, OSError) as exc:
            log.warning("could not remove the mesh interface %s: %s", self.mesh.interface, exc)
        removed += self.restore_sysctls()
        if plumbing.remove_bridge(self.bridge):
            removed.append(f"bridge {self.bridge}")
        self._on_change()
        return removed

    # ------------------------------------------------------------ the cluster's other nodes

    def set_peers(self, blocks: list[PeerBlock], force: bool = False) -> list[str]:
        """Blocking: route each other node's block (through the mesh when it is on and
        the block carries a WireGuard key, via that node otherwise) and let them into
        the bridge (the ``peers`` sets); routes to blocks no longer named go. What changed."""
        if blocks == self.peer_blocks and not force:
            return []
        others = [b for b in blocks if b.subnet != str(self.subnet)]
        meshed = {b.subnet for b in others if b.wireguard_key} if self.mesh.running else set()
        plain = {b.subnet: b.address for b in others if b.subnet not in meshed}
        peers: nft.Peers = (
            tuple(sorted({*(b.subnet for b in others), *plain.values()})),
            tuple(sorted({b.subnet for b in others})),
        )
        if peers != self.peers:
            nft.run_transaction(nft.peers_update(self.table, peers))
            self.peers = peers
        changed = plumbing.set_peer_routes(plain)
        if self.mesh.running:
            changed += self.mesh.set_peers(others, force=force)
        self.peer_blocks = list(blocks)
        return changed

    # ------------------------------------------------------------ the mesh

    def check_mesh(self) -> list[str]:
        """Blocking: bring the mesh back if its interface went away (wireguard-go died)."""
        device = self.mesh.device
        if not self.mesh.enabled or (device is not None and device.running()):
            return []
        self.mesh.device = None
        done = self.mesh.up()
        done += self.set_peers(self.peer_blocks, force=True)
        return done

    def enable_mesh(self, listen_port: int) -> list[str]:
        """Blocking: the mesh on (its rules in the table), then the blocks with keys
        moved onto it. What was done; MeshError says why it could not be."""
        was = self.mesh.enabled
        done = self.mesh.enable(listen_port)
        if not was:
            self._apply_table()
        done += self.set_peers(self.peer_blocks, force=True)
        return done


def _label(allocation: Allocation) -> str:
    return plumbing.label(allocation.container_id, allocation.hostname)


def _parse_sysctls(text: str) -> dict[str, str]:
    data = json.loads(text)
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise StateFormatError("it is not a record of settings")
    return data
