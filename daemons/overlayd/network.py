"""The node network as one object: settings, IPAM, bridge, nftables and attachments.

:class:`NodeNetwork` is blocking and not thread-safe by design: the daemon
runs each call in a worker thread, one at a time (an asyncio lock), so the
event loop keeps serving the bus while netlink and nft work.

It persists only the allocations (``allocations.json`` in overlayd's state
directory); everything else (bridge, table, namespaces, veths) is rebuilt
or repaired from them on start, which is what lets overlayd restart while
replicas keep running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from daemons.overlayd import nft, plumbing
from daemons.overlayd.ipam import Allocation, ExhaustedError, Ipam
from daemons.overlayd.plumbing import IFACE, Names
from daemons.overlayd.settings import OverlaySettings, host_resolvers
from shared.models import Attachment, NetworkInfo

STATE_FILE = "allocations.json"
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
        self.resolv_conf = resolv_conf
        self.ipam = Ipam(self.subnet)
        self.gateway = self.ipam.gateway
        self.dns: list[str] = []
        self.search: list[str] = []
        self._on_change = on_change or (lambda: None)

    # ------------------------------------------------------------ start

    def load(self) -> None:
        """Read the persisted allocations."""
        self.ipam = Ipam.load(self.subnet, self.state_path)

    def setup(self) -> list[str]:
        """Bridge, forwarding and NAT; the resolvers replicas get. What was done, for the log."""
        done: list[str] = []
        self._read_resolvers()
        conflicts = plumbing.conflicting_addresses(self.subnet, self.bridge)
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
        if plumbing.enable_forwarding():
            done.append("turned IPv4 forwarding on")
        try:
            nft.apply(self.table, self.bridge, self.subnet)
        except nft.NftError as exc:
            raise SetupError(str(exc)) from None
        return done

    def _read_resolvers(self) -> None:
        host: tuple[list[str], list[str], list[str]] = ([], [], [])
        if self.settings.nameservers is None or self.settings.search_domains is None:
            try:
                host = host_resolvers(self.resolv_conf.read_text())
            except OSError as exc:
                log.warning("cannot read %s (%s); replicas get no resolvers", self.resolv_conf, exc)
        usable, skipped, search = host
        if self.settings.nameservers is None:
            self.dns = usable
            if skipped:
                log.warning(
                    "not giving replicas the host's loopback resolvers %s (a replica cannot "
                    "reach the host's loopback); set nameservers in overlayd.toml to choose",
                    ", ".join(skipped),
                )
            if not usable:
                log.warning(
                    "the host has no resolver replicas can reach; set nameservers in overlayd.toml"
                )
        else:
            self.dns = list(self.settings.nameservers)
        self.search = (
            search if self.settings.search_domains is None else list(self.settings.search_domains)
        )

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
        prefixlen = self.subnet.prefixlen
        for allocation in self.ipam.all():
            names = names_of(allocation, self.bridge)
            state = plumbing.inspect(names, self.bridge, allocation.address, prefixlen)
            if state.healthy:
                continue
            if not state.netns:
                plumbing.unplumb(names)
                self.ipam.release(allocation.container_id)
                repaired.append(
                    f"released {allocation.address} of {allocation.container_id}: "
                    f"its namespace {names.netns} is gone"
                )
                continue
            steps = plumbing.plumb(names, self.bridge, allocation.address, prefixlen, self.gateway)
            repaired.append(f"repaired {allocation.container_id}: {'; '.join(steps)}")
        self._on_change()
        return repaired

    # ------------------------------------------------------------ attachments

    def attach(self, container_id: str, hostname: str) -> Attachment:
        if not container_id or "\n" in container_id:
            raise AttachError("a container id is needed to attach a network")
        allocation = self.ipam.get(container_id)
        fresh = allocation is None
        if allocation is None:
            names = plumbing.names_for(self.bridge, container_id)
            try:
                # Recorded before anything is created, so a crash in between
                # leaves a record that the next start repairs or releases.
                allocation = self.ipam.allocate(
                    container_id, hostname, names.netns, names.host_veth
                )
            except ExhaustedError as exc:
                raise AttachError(str(exc)) from None
        names = names_of(allocation, self.bridge)
        try:
            plumbing.plumb(
                names, self.bridge, allocation.address, self.subnet.prefixlen, self.gateway
            )
        except Exception:
            if fresh:
                plumbing.unplumb(names)
                self.ipam.release(container_id)
            raise
        self._on_change()
        return self._attachment(allocation)

    def detach(self, container_id: str) -> bool:
        """Remove a container's network; False if it had none."""
        allocation = self.ipam.get(container_id)
        if allocation is None:
            names = plumbing.names_for(self.bridge, container_id)
        else:
            names = names_of(allocation, self.bridge)
        removed = plumbing.unplumb(names)
        self.ipam.release(container_id)
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
        if nft.remove(self.table):
            removed.append(f"nft table ip {self.table}")
        if plumbing.remove_bridge(self.bridge):
            removed.append(f"bridge {self.bridge}")
        self._on_change()
        return removed
