"""Netlink work for overlayd: the bridge, named network namespaces, veth pairs.

Everything here is blocking (pyroute2 over netlink) and meant to run in a
worker thread, one operation at a time. Each function is idempotent: it
looks at what is there and does only what is missing, so overlayd can
repeat any of them after a crash or a restart.

Names are derived from the bridge and the container id, so they can always
be found again: the namespace ``zl-<hash>`` (namespace names are global to
the machine, and the bridge in the hash keeps two overlayd instances apart)
and the host end of the veth ``zlv<hash>`` (15 characters, the kernel's
limit). The peer is created as ``eth0`` right inside the namespace (a
``zlp<hash>`` an older version left there is removed). The host end carries
the container id in its alias (:func:`label`), so the attachments on a node
can be listed without any file (:func:`live_attachments`): overlayd takes its
allocations back from them when its state file is lost.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from shared.libc import check, last_errno, libc

NETNS_DIR = Path("/run/netns")
SYSCTL_DIR = Path("/proc/sys")
IP_FORWARD = "net/ipv4/ip_forward"  # a key: the path under /proc/sys
IFACE = "eth0"
LOOPBACK_INDEX = 1  # the kernel makes lo first in every new network namespace
HASH_LEN = 12

MS_REC = 16384
MS_BIND = 4096
MS_SHARED = 1 << 20
MNT_DETACH = 2
CLONE_NEWNET = 0x40000000
THREAD_NETNS = "/proc/thread-self/ns/net"


class PlumbingError(Exception):
    """Network setup that failed, in one sentence."""


@dataclass(frozen=True)
class Names:
    """The derived names of one container's network."""

    netns: str
    host_veth: str
    peer: str

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def names_for(bridge: str, container_id: str) -> Names:
    digest = hashlib.sha256(f"{bridge}/{container_id}".encode()).hexdigest()[:HASH_LEN]
    return Names(netns=f"zl-{digest}", host_veth=f"zlv{digest}", peer=f"zlp{digest}")


def label(container_id: str, hostname: str = "") -> str:
    """The alias of a container's host veth: who it belongs to (at most 255 bytes)."""
    text = json.dumps({"container": container_id, "hostname": hostname}, separators=(",", ":"))
    if len(text.encode()) > 255:
        text = json.dumps({"container": container_id}, separators=(",", ":"))
    return text if len(text.encode()) <= 255 else ""


def _read_label(alias: str | None) -> tuple[str, str]:
    try:
        data = json.loads(alias or "")
    except ValueError:
        return "", ""
    if not isinstance(data, dict) or not isinstance(data.get("container"), str):
        return "", ""
    return data["container"], str(data.get("hostname", ""))


@dataclass(frozen=True)
class LiveAttachment:
    """A container network found on the node: a port of the bridge and its namespace."""

    names: Names
    container_id: str  # "" if the veth carries no label (made by an older overlayd)
    hostname: str
    address: IPv4Address | None  # eth0's inside the namespace, if it is there


def live_attachments(bridge: str) -> list[LiveAttachment]:
    """Every container network on ``bridge``: its ``zlv`` ports, with label and address."""
    with IPRoute() as ip:
        index = _lookup(ip, bridge)
        if index is None:
            return []
        ports = [link for link in ip.get_links() if link.get("master") == index]
    found: list[LiveAttachment] = []
    for link in ports:
        host_veth = str(link.get_attr("IFLA_IFNAME") or "")
        if not host_veth.startswith("zlv"):
            continue
        digest = host_veth[3:]
        names = Names(netns=f"zl-{digest}", host_veth=host_veth, peer=f"zlp{digest}")
        container_id, hostname = _read_label(link.get_attr("IFLA_IFALIAS"))
        if container_id and names_for(bridge, container_id) != names:
            container_id = hostname = ""  # not this bridge's name for that container
        address = address_inside(names) if names.netns_path.exists() else None
        found.append(LiveAttachment(names, container_id, hostname, address))
    return found


def address_inside(names: Names) -> IPv4Address | None:
    """The IPv4 address of eth0 in the container's namespace; None if there is none."""
    try:
        with _in_netns(names.netns) as inner:
            index = _lookup(inner, IFACE)
            if index is None:
                return None
            for record in inner.get_addr(family=2, index=index):
                return IPv4Address(record.get_attr("IFA_ADDRESS"))
    except (NetlinkError, OSError, ValueError):
        return None
    return None


def set_label(names: Names, text: str) -> bool:
    """Give the host veth its alias; True if it had another one."""
    with IPRoute() as ip:
        index = _lookup(ip, names.host_veth)
        if index is None or not text:
            return False
        if _link(ip, index).get_attr("IFLA_IFALIAS") == text:
            return False
        ip.link("set", index=index, ifalias=text)
    return True


def mac_for(address: IPv4Address) -> str:
    """The replica's MAC address, derived from its IP address (locally administered).

    A replica whose interface is recreated (repair, restart) keeps its MAC,
    so its neighbours' ARP caches stay right and traffic does not stall
    until they expire.
    """
    return "02:5a:" + ":".join(f"{byte:02x}" for byte in address.packed)


@dataclass(frozen=True)
class Plumbed:
    """What one container's network looks like now."""

    netns: bool  # the named namespace exists
    veth: bool  # the host end exists
    on_bridge: bool  # ... is a port of the bridge and up
    inside: bool  # eth0 inside has the address, is up, and the default route is there

    @property
    def healthy(self) -> bool:
        return self.netns and self.veth and self.on_bridge and self.inside


# ---------------------------------------------------------------- host-wide


def prepare_netns_dir() -> None:
    """Make /run/netns a shared mount of its own, as ``ip netns add`` does.

    Doing it once at start, rather than on the first Attach, means the
    mount exists before any replica does (and is not mistaken for one's).
    """
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    target = str(NETNS_DIR).encode()
    if libc().mount(b"none", target, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    # Not a mount point yet: bind it onto itself, then share it.
    if libc().mount(target, target, b"none", MS_BIND | MS_REC, None) != 0:
        err = last_errno()
        raise PlumbingError(f"cannot bind-mount {NETNS_DIR} ({os.strerror(err)})")
    if libc().mount(b"none", target, b"none", MS_SHARED | MS_REC, None) != 0:
        err = last_errno()
        raise PlumbingError(f"cannot make {NETNS_DIR} a shared mount ({os.strerror(err)})")


def route_localnet(bridge: str) -> str:
    """The key of the bridge's route_localnet (127.0.0.0/8 carried on it)."""
    return f"net/ipv4/conf/{bridge}/route_localnet"


def sysctl_path(key: str) -> Path:
    return SYSCTL_DIR / key


def sysctl_name(key: str) -> str:
    """A key as ``sysctl`` names it (dots; a dot in an interface name becomes a slash)."""
    return ".".join(part.replace(".", "/") for part in key.split("/"))


def read_sysctl(key: str) -> str:
    return sysctl_path(key).read_text().strip()


def write_sysctl(key: str, value: str) -> None:
    sysctl_path(key).write_text(value + "\n")


def zlayer_bridges(exclude: str = "") -> list[str]:
    """The bridges on this host that an overlayd made (their MAC is :func:`bridge_mac`'s)."""
    found: list[str] = []
    with IPRoute() as ip:
        for link in ip.get_links():
            name = str(link.get_attr("IFLA_IFNAME") or "")
            if name == exclude or link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "bridge":
                continue
            if str(link.get_attr("IFLA_ADDRESS") or "").lower() == bridge_mac(name):
                found.append(name)
    return sorted(found)


def conflicting_addresses(subnet: IPv4Network, bridge: str, *own: str) -> list[str]:
    """Addresses on other interfaces than the bridge and ``own`` (the mesh's, which
    carries the gateway) that overlap ``subnet``, as "addr/len on dev"."""
    found: list[str] = []
    with IPRoute() as ip:
        names = {link["index"]: link.get("ifname") for link in ip.get_links()}
        for record in ip.get_addr(family=2):
            owner = names.get(record["index"], "?")
            if owner == bridge or owner in own:
                continue
            iface = IPv4Interface(f"{record.get('address')}/{record['prefixlen']}")
            if iface.network.overlaps(subnet):
                found.append(f"{iface} on {owner}")
    return found


def ensure_bridge(bridge: str, gateway: IPv4Address, prefixlen: int) -> list[str]:
    """The bridge, up, with the gateway address; what had to be done, for the log."""
    done: list[str] = []
    with IPRoute() as ip:
        index = _lookup(ip, bridge)
        if index is None:
            ip.link("add", ifname=bridge, kind="bridge")
            done.append(f"created the bridge {bridge}")
            index = _must_lookup(ip, bridge)
        elif _link(ip, index).get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "bridge":
            raise PlumbingError(f"{bridge} exists and is not a bridge; choose another name")
        if not _mac_is_fixed(bridge):
            # A bridge with a random MAC takes its lowest port's: every new
            # replica could change the gateway's MAC under the others, whose
            # ARP entries then point nowhere for seconds (lost SYNs, stalls).
            ip.link("set", index=index, address=bridge_mac(bridge))
            done.append(f"fixed the MAC address of {bridge}")
        have = {(r.get("address"), r["prefixlen"]) for r in ip.get_addr(family=2, index=index)}
        if (str(gateway), prefixlen) not in have:
            ip.addr("add", index=index, address=str(gateway), prefixlen=prefixlen)
            done.append(f"gave {bridge} the address {gateway}/{prefixlen}")
        # A node that joined a cluster moved to its block: the old gateway left on
        # the bridge would answer for an address another node's block now holds.
        for address, length in have - {(str(gateway), prefixlen)}:
            ip.addr("del", index=index, address=address, prefixlen=length)
            done.append(f"took {address}/{length} off {bridge} (the subnet changed)")
        if not _is_up(_link(ip, index)):
            ip.link("set", index=index, state="up")
            done.append(f"brought {bridge} up")
        done += _clamp_local_advmss(ip, index, bridge, gateway)
    return done


def _clamp_local_advmss(ip: IPRoute, index: int, bridge: str, gateway: IPv4Address) -> list[str]:
    """Give the gateway's local route the bridge's MSS.

    A node process connecting to a published port on the gateway address gets
    a route through loopback (MTU 65536, MSS 65483), while DNAT carries its
    connection over the bridge (MTU 1500). Sized for the wrong MSS, the
    socket's receive buffer stays at its initial size and its window keeps
    closing: measured, about 1.5 times the CPU per MiB of connecting to the
    replica directly; with the bridge's MSS on this route, the same as direct.
    """
    mtu = int(_link(ip, index).get_attr("IFLA_MTU") or 1500)
    want = mtu - 40  # IPv4 and TCP headers, as the kernel derives it from a route's MTU
    found = ip.get_routes(family=2, dst=str(gateway))  # the route a connect() gets
    metrics = found[0].get_attr("RTA_METRICS") if found else None
    have = dict(metrics.get("attrs", [])) if metrics else {}
    if have.get("RTAX_ADVMSS") == want:
        return []
    try:
        ip.route(
            "change",
            table=255,  # local
            type=2,  # local
            dst=str(gateway),
            dst_len=32,
            oif=index,
            proto=2,  # kernel
            scope=254,  # host
            prefsrc=str(gateway),
            metrics={"RTAX_ADVMSS": want},
        )
    except NetlinkError as exc:  # only slower, never wrong: say so and go on
        return [f"left {gateway}'s local route with loopback's MSS: {exc}"]
    return [f"set the MSS of {gateway}'s local route to {bridge}'s ({want})"]


def bridge_mac(bridge: str) -> str:
    """A stable, locally administered unicast MAC for the bridge, from its name."""
    digest = hashlib.sha256(f"zlayer-bridge/{bridge}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _mac_is_fixed(bridge: str) -> bool:
    """Whether the bridge's MAC was set (NET_ADDR_SET), so ports cannot change it."""
    try:
        return Path(f"/sys/class/net/{bridge}/addr_assign_type").read_text().strip() == "3"
    except OSError:
        return False


def remove_bridge(bridge: str) -> bool:
    """Delete the bridge; False if it was not there."""
    with IPRoute() as ip:
        index = _lookup(ip, bridge)
        if index is None:
            return False
        ip.link("del", index=index)
    return True


# ---------------------------------------------------------------- one container


def inspect(names: Names, bridge: str, address: IPv4Address, prefixlen: int) -> Plumbed:
    has_netns = names.netns_path.exists()
    veth = on_bridge = inside = False
    with IPRoute() as ip:
        index = _lookup(ip, names.host_veth)
        if index is not None:
            veth = True
            link = _link(ip, index)
            bridge_index = _lookup(ip, bridge)
            on_bridge = bridge_index is not None and link.get("master") == bridge_index
            on_bridge = on_bridge and _is_up(link) and _hairpin(names.host_veth)
    if has_netns and veth:
        inside = _inside_ok(names, address, prefixlen)
    return Plumbed(has_netns, veth, on_bridge, inside)


def plumb(
    names: Names,
    bridge: str,
    address: IPv4Address,
    prefixlen: int,
    gateway: IPv4Address,
    alias: str = "",
    *,
    empty_netns: bool = False,
) -> list[str]:
    """Namespace, veth pair, addresses and route for one container; what was done.

    ``alias`` (:func:`label`) is set on the host veth. ``empty_netns``: the
    namespace exists and holds nothing yet (made by :func:`create_netns` just
    before), so it is not searched for leftovers.
    """
    # Each netlink request through pyroute2 costs milliseconds: names in this
    # namespace are looked up with if_nametoindex, a fresh namespace is not
    # searched for leftovers, and settings go together where the kernel takes them so.
    done: list[str] = []
    created = not names.netns_path.exists()
    if created:
        create_netns(names.netns_path)
        done.append(f"created the namespace {names.netns}")
    fresh = created or empty_netns
    with IPRoute() as ip:
        bridge_index = _index(bridge)
        if bridge_index is None:
            raise PlumbingError(f"the bridge {bridge} is gone; restart zlayer-overlayd")
        index = _index(names.host_veth)
        if index is not None and not _inside_ok(names, address, prefixlen):
            # Half made (a crash between steps): start the pair over.
            ip.link("del", index=index)
            done.append(f"removed the incomplete {names.host_veth}")
            index = None
        if index is None:
            if not fresh:
                with _in_netns(names.netns) as inner:
                    for stale in (names.peer, IFACE):
                        stale_index = _lookup(inner, stale)
                        if stale_index is not None:
                            inner.link("del", index=stale_index)
            netns_fd = os.open(names.netns_path, os.O_RDONLY)
            try:
                ip.link(
                    "add",
                    ifname=names.host_veth,
                    kind="veth",
                    # Made as eth0 in its namespace at once: a rename there costs
                    # one more request and the kernel's rename work.
                    peer={
                        "ifname": IFACE,
                        "address": mac_for(address),
                        "net_ns_fd": netns_fd,
                    },
                )
            finally:
                os.close(netns_fd)
            index = _index(names.host_veth)
            if index is None:
                raise PlumbingError(
                    f"the interface {names.host_veth} vanished while it was being set up"
                )
            with _in_netns(names.netns) as inner:
                peer = _must_lookup(inner, IFACE)
                inner.addr("add", index=peer, address=str(address), prefixlen=prefixlen)
                inner.link("set", index=peer, state="up")
                loopback = LOOPBACK_INDEX if fresh else _must_lookup(inner, "lo")
                inner.link("set", index=loopback, state="up")
                inner.route("add", dst="0.0.0.0/0", gateway=str(gateway))
            # Alias, bridge and up in one request.
            ip.link("set", index=index, master=bridge_index, state="up", **_alias(alias))
            done.append(f"connected {names.netns} to {bridge} through {names.host_veth}")
        else:
            link = _link(ip, index)
            if link.get("master") != bridge_index or not _is_up(link):
                ip.link("set", index=index, master=bridge_index, state="up")
                if not done:
                    done.append(f"put {names.host_veth} back on {bridge}")
        if not _hairpin(names.host_veth):
            # A replica reaching a published port whose backend is itself.
            _set_hairpin(ip, names.host_veth, index)
            if not done:
                done.append(f"turned hairpin on for {names.host_veth}")
    return done


def _alias(alias: str) -> dict[str, str]:
    return {"ifalias": alias} if alias else {}


def _index(name: str) -> int | None:
    """The index of an interface in this thread's namespace; None if there is none."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _hairpin(port: str) -> bool:
    try:
        return Path(f"/sys/class/net/{port}/brport/hairpin_mode").read_text().strip() == "1"
    except OSError:
        return False


def _set_hairpin(ip: IPRoute, port: str, index: int) -> None:
    # sysfs takes it in microseconds; a netlink request through pyroute2 costs about
    # a millisecond, and is the way where sysfs is read-only.
    try:
        Path(f"/sys/class/net/{port}/brport/hairpin_mode").write_text("1")
    except OSError:
        ip.link("set", index=index, kind="bridge_slave", mode=1)


def unplumb(names: Names) -> list[str]:
    """Remove the veth pair and the namespace; what was removed."""
    done: list[str] = []
    with IPRoute() as ip:
        index = _lookup(ip, names.host_veth)
        if index is not None:
            with contextlib.suppress(NetlinkError):
                ip.link("del", index=index)
            done.append(names.host_veth)
    if names.netns_path.exists():
        remove_netns(names.netns_path)
        done.append(names.netns)
    return done


# ---------------------------------------------------------------- namespaces
#
# Done in the calling thread with unshare/setns instead of pyroute2's
# helpers, which fork: a forked child of an asyncio daemon inherits its
# signal wakeup fd, and the SIGTERM pyroute2 sends the child then reaches
# the daemon's loop as if the daemon had been asked to stop. A network
# namespace switch is per thread, so the worker thread enters and leaves
# while the rest of the process stays put.


def create_netns(path: Path) -> None:
    """A new network namespace, kept alive by a bind mount at ``path``."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        home = os.open(THREAD_NETNS, os.O_RDONLY)
        try:
            check(libc().unshare(CLONE_NEWNET), "unshare")
            try:
                check(
                    libc().mount(THREAD_NETNS.encode(), str(path).encode(), b"none", MS_BIND, None),
                    f"mount {path}",
                )
            finally:
                _return_home(home)
        finally:
            os.close(home)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def remove_netns(path: Path) -> None:
    """Unmount and delete a named namespace (it lives on while processes are in it)."""
    if libc().umount2(str(path).encode(), MNT_DETACH) != 0:
        err = last_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted any more
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def _in_netns(name: str) -> Iterator[IPRoute]:
    """A netlink socket inside the named namespace (a socket stays in the namespace it
    was opened in, so only its creation needs the thread to be there)."""
    target = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        home = os.open(THREAD_NETNS, os.O_RDONLY)
        try:
            check(libc().setns(target, CLONE_NEWNET), f"setns {name}")
            try:
                inner = IPRoute()
            finally:
                _return_home(home)
        finally:
            os.close(home)
    finally:
        os.close(target)
    try:
        yield inner
    finally:
        inner.close()


def _return_home(home: int) -> None:
    if libc().setns(home, CLONE_NEWNET) != 0:
        # A worker thread left in a replica's namespace would do the next
        # job in the wrong place: better to stop and be restarted.
        os.write(2, b"zlayer-overlayd: cannot return a thread to its network namespace\n")
        os._exit(70)


# ---------------------------------------------------------------- helpers


def _inside_ok(names: Names, address: IPv4Address, prefixlen: int) -> bool:
    try:
        with _in_netns(names.netns) as inner:
            index = _lookup(inner, IFACE)
            if index is None or not _is_up(_link(inner, index)):
                return False
            addresses = {
                (r.get("address"), r["prefixlen"]) for r in inner.get_addr(family=2, index=index)
            }
            if (str(address), prefixlen) not in addresses:
                return False
            defaults = [r for r in inner.get_routes(family=2) if r["dst_len"] == 0]
            return any(r.get("oif") == index for r in defaults)
    except (NetlinkError, OSError):
        return False


def _lookup(ip: IPRoute, name: str) -> int | None:
    found = ip.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _must_lookup(ip: IPRoute, name: str) -> int:
    index = _lookup(ip, name)
    if index is None:
        raise PlumbingError(f"the interface {name} vanished while it was being set up")
    return index


def _link(ip: IPRoute, index: int) -> Any:
    return ip.get_links(index)[0]


def _is_up(link: Any) -> bool:
    return bool(link["flags"] & 1)  # IFF_UP


# The protocol number overlayd's routes to other nodes' blocks carry, so it finds
# (and removes) its own and no one else's, across restarts.
PEER_ROUTE_PROTO = 90


def set_peer_routes(wanted: dict[str, str]) -> list[str]:
    """Routes to the cluster's other blocks (cidr -> the node address it goes via):
    each one made or corrected, those overlayd made before and no longer wanted
    removed. What changed, for the log."""
    done: list[str] = []
    with IPRoute() as ip:
        held: dict[str, str] = {}
        for route in ip.get_routes(family=socket.AF_INET, proto=PEER_ROUTE_PROTO):
            dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
            held[dst] = str(route.get_attr("RTA_GATEWAY") or "")
        for dst in held:
            if dst not in wanted:
                with contextlib.suppress(NetlinkError):
                    ip.route("del", dst=dst, proto=PEER_ROUTE_PROTO)
                    done.append(f"route to {dst} removed")
        for dst, via in sorted(wanted.items()):
            if held.get(dst) == via:
                continue
            try:
                ip.route("replace", dst=dst, gateway=via, proto=PEER_ROUTE_PROTO)
                done.append(f"route to {dst} via {via}")
            except NetlinkError as exc:  # the node's address not on a link of ours (yet)
                done.append(f"no route to {dst} via {via}: {os.strerror(exc.code)}")
    return done
