"""Address management for the node subnet: who holds which address, kept on disk.

The first host address of the subnet is the gateway (the bridge's); the
network and broadcast addresses are never handed out. Allocation walks
forward from the last address given, so a released address is reused only
after the rest of the subnet has been, which keeps stale ARP entries of a
removed replica from pointing at a new one.

Every change is written to the state file atomically
(:func:`shared.statefile.write_atomically`), so allocations survive a restart
or a crash of overlayd. A state file that cannot be used is moved aside and
the allocations start empty; overlayd then takes them back from the
attachments that exist on the node (:meth:`Ipam.adopt`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from shared.statefile import StateFormatError, read_state, remove_leftovers, write_atomically

STATE_VERSION = 1


class IpamError(Exception):
    """An allocation that cannot be made, in one sentence."""


class ExhaustedError(IpamError):
    """Every address of the subnet is in use."""


@dataclass(frozen=True)
class Allocation:
    """One container's address and the names of what carries it."""

    container_id: str
    address: IPv4Address
    hostname: str = ""
    netns: str = ""
    host_veth: str = ""

    def to_json(self) -> dict[str, str]:
        data = asdict(self)
        data["address"] = str(self.address)
        del data["container_id"]
        return data


def gateway_of(subnet: IPv4Network) -> IPv4Address:
    return subnet.network_address + 1


def capacity(subnet: IPv4Network) -> int:
    """Addresses replicas can get: all but network, gateway and broadcast."""
    return max(subnet.num_addresses - 3, 0)


class Ipam:
    """The allocations of one subnet, optionally persisted at ``path``."""

    def __init__(self, subnet: IPv4Network, path: Path | None = None) -> None:
        if subnet.prefixlen > 30:
            raise IpamError(f"the subnet {subnet} has no room for a gateway and a replica")
        self.subnet = subnet
        self.gateway = gateway_of(subnet)
        self.path = path
        self._by_id: dict[str, Allocation] = {}
        self._by_address: dict[IPv4Address, str] = {}
        self._last = self.gateway
        self.dropped: list[Allocation] = []  # loaded records outside the subnet

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, container_id: str) -> Allocation | None:
        return self._by_id.get(container_id)

    def all(self) -> list[Allocation]:
        return sorted(self._by_id.values(), key=lambda a: int(a.address))

    @property
    def first(self) -> IPv4Address:
        return self.gateway + 1

    @property
    def last(self) -> IPv4Address:
        return self.subnet.broadcast_address - 1

    # ------------------------------------------------------------ changes

    def allocate(
        self, container_id: str, hostname: str = "", netns: str = "", host_veth: str = ""
    ) -> Allocation:
        """The container's allocation, made now unless it already has one."""
        current = self._by_id.get(container_id)
        if current is not None:
            return current
        address = self._next_free()
        allocation = Allocation(container_id, address, hostname, netns, host_veth)
        self._add(allocation)
        self._last = address
        self.save()
        return allocation

    def release(self, container_id: str) -> Allocation | None:
        """Give the container's address back; None if it had none."""
        allocation = self._by_id.pop(container_id, None)
        if allocation is None:
            return None
        del self._by_address[allocation.address]
        self.save()
        return allocation

    def adopt(self, allocation: Allocation) -> bool:
        """Record an address found in use on the node; False if it is not this subnet's to
        give or another container holds it."""
        usable = self.first <= allocation.address <= self.last
        if not usable or allocation.address in self._by_address:
            return False
        if allocation.container_id in self._by_id:
            return False
        self._add(allocation)
        self.save()
        return True

    def _add(self, allocation: Allocation) -> None:
        self._by_id[allocation.container_id] = allocation
        self._by_address[allocation.address] = allocation.container_id

    def _next_free(self) -> IPv4Address:
        first, last = int(self.first), int(self.last)
        size = last - first + 1
        start = int(self._last) + 1
        if not first <= start <= last:
            start = first
        for step in range(size):
            candidate = IPv4Address(first + (start - first + step) % size)
            if candidate not in self._by_address:
                return candidate
        raise ExhaustedError(
            f"the subnet {self.subnet} has no free address left ({len(self)} in use); "
            "detach containers that are gone or give overlayd a larger subnet"
        )

    # ------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "subnet": str(self.subnet),
            "last": str(self._last),
            "allocations": {a.container_id: a.to_json() for a in self.all()},
        }

    def save(self) -> None:
        if self.path is None:
            return
        # Not fsynced: an attachment's namespace and veth do not outlive a power
        # cut, and a file lost to one is rebuilt from the attachments that exist.
        write_atomically(
            self.path,
            json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n",
            durable=False,
        )

    @classmethod
    def load(cls, subnet: IPv4Network, path: Path) -> Ipam:
        """The allocations saved at ``path`` (none if it does not exist yet).

        A file that cannot be read or is not an allocations file is moved
        aside (logged): the allocations start empty, for the caller to take
        back from what exists on the node. Records whose address lies outside
        ``subnet`` (the subnet setting changed) are left out and listed in
        ``dropped`` for the caller to tear down.
        """
        ipam = cls(subnet, path)
        remove_leftovers(path)
        data = read_state(
            path, _parse_state, "taking the allocations back from the attachments on this node"
        )
        if data is None:
            return ipam
        for allocation in data[0]:
            usable = ipam.first <= allocation.address <= ipam.last
            if usable and allocation.address not in ipam._by_address:
                ipam._add(allocation)
            else:
                ipam.dropped.append(allocation)
        last = data[1]
        ipam._last = last if last is not None and last in subnet else ipam.gateway
        return ipam


def _parse_state(text: str) -> tuple[list[Allocation], IPv4Address | None]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise StateFormatError("it is not an allocations file of this overlayd version")
    records = data.get("allocations", {})
    if not isinstance(records, dict):
        raise StateFormatError("its allocations are not a JSON object")
    allocations = [
        Allocation(
            container_id=container_id,
            address=IPv4Address(record["address"]),
            hostname=str(record.get("hostname", "")),
            netns=str(record.get("netns", "")),
            host_veth=str(record.get("host_veth", "")),
        )
        for container_id, record in records.items()
    ]
    try:
        last: IPv4Address | None = IPv4Address(data.get("last", ""))
    except ValueError:
        last = None
    return allocations, last
