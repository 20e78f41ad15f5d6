"""Several ZLayer nodes on one machine, for the cluster tests.

A :class:`Cluster` of N nodes is a bridge on the host (the nodes' shared LAN,
``zltc<tag>``, a free /24 of 172.31.0.0/16 with the host on ``.1`` so tests
reach every node) and, per node, a network namespace (``zlt-c<tag>-n<k>``)
joined to it by a veth with a fixed MAC and the address ``.<10+k>``, a prefix
of its own (config, state, run and log dirs), an overlayd bridge of its own
(``zlb<tag>n<k>``), the six daemons with their private bus under ``zlayerctl
daemon run``, and an etcd member (the members form one etcd on the LAN, ports
2379 and 2380), all started inside the namespace.

Replica subnets: with the harness's etcd each node's overlayd has a subnet of
its own (``10.90.<k>.0/24``). A cluster formed by ``node init`` (``etcd=False``)
starts every node on the same one (``10.90.0.0/16``), as every machine has
overlayd's default: init makes it the cluster's range, and init and each join
give the node a /24 block of it, which overlayd moves to. :attr:`Node.subnet`
is the node's block once it has one.

Each node's agentd puts its replicas' cgroups under a parent of the node's own
(``cgroup_parent``, ``zlayer-c<tag>-n<k>``), as on separate machines: a replica's
id is the same on every node, and a moved replica's two copies must not share one.

Each node also has a UTS namespace of its own, so its hostname is its name
(``n1``). Only these two are entered (``nsenter --net --uts``), not the mount
namespace ``ip netns exec`` makes: that one remounts /sys and so hides
/sys/fs/cgroup, which agentd and crun need. Every node therefore sees the
host's mounts, /run/netns and cgroups, and the host's leak checks see what a
node leaves there.

:meth:`Node.kill` is a node dying outright: every process of the node is
stopped and then killed by PID (those the harness started, those that carry
the node's prefix in their environment, those inside its network namespace or
its replicas'), its containers' runtime state, mounts, cgroups and replica
namespaces are removed, its namespace is deleted and its run dir (a tmpfs on
a real machine) is emptied; its config, state and etcd data stay, as a disk
does. :meth:`Node.restart` boots it again. :meth:`Cluster.close` kills every
node and removes the bridge and the prefixes, whatever state a failed test
left them in; :meth:`Cluster.leftovers` names anything of the cluster still on
the machine.

Once ``zlayerctl node init``/``join`` start etcd themselves, ``Cluster(n,
etcd=False)`` leaves the members to them.

``Cluster(n, etcd=False, topology="routed")`` joins the nodes through a router
instead of one bridge: each node's veth goes to a router namespace
(``zlt-c<tag>-r``) on a /29 of its own (router ``.1``, node ``.2``), the router
forwards between them, and the host reaches them through a link of its own to
the router (``zltc<tag>h``). With ``nat=[2]`` node 3 sits behind a NAT
namespace (``zlt-c<tag>-nat3``, nftables masquerade) in front of the router:
its own address is a private one no other node has a route to, and only
connections it opens cross; its schedd has no ``behind_nat``: its join, seen
coming from the NAT's address, tells it (so it joins as an etcd client and the
others wait for its mesh handshake). ``mesh_keepalive`` sets
schedd's keepalive on every node (short, so a NAT mapping is kept within a
test), ``mesh=False`` turns the mesh off; by default neither is written.
:meth:`Cluster.in_router` runs a command in the router's namespace (a capture,
nft counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psutil
from pyroute2 import IPRoute, NetlinkError, netns

from ctl.supervisor import find_executable
from ctl.supervisor_state import SupervisorState
from shared.bus import DAEMONS
from shared.paths import PREFIX_ENV, Paths
from tests.conftest import prefix_processes

if TYPE_CHECKING:
    from shared.cluster.etcd import EtcdMember

IMAGE = "zlayer/busybox:latest"
LANS = IPv4Network("172.31.0.0/16")  # each cluster's LAN is a free /24 in it
LAN_IFACE = "lan0"  # the node's end of its veth, inside its namespace
READY_TIMEOUT = 90.0
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUNTIMES = ("crun", "runc")
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_HEALTHY_WITHIN = 30.0
ROUTED_LINK = 29  # the prefix of each link to the router in a routed cluster
PRIVATE_BLOCKS = 16  # a node behind NAT: its private /29 is this many /29s further on

_sequence = itertools.count()
ROOTS = Path(tempfile.gettempdir())  # short: unix socket paths end at 108 bytes
ROOT_PREFIX = "zlt-c"
OWNER = "owner"  # in a cluster's directory: "<pid> <start time>" of the process that made it
UNCLEAN = "unclean"  # in a cluster's directory: its clean-up failed, sweep it again
# Every cluster this process made, closed or not: the leak check asks each what is its.
CLUSTERS: list[Cluster] = []
# What a failed test shows of each node's logs (Cluster.log_tails): the last lines of
# the daemons that decide, and etcd's last warnings.
# the supervisor's: when it started, stopped or restarted etcd (a promoted client's member)
LOG_TAIL = {"schedd.log": 15, "agentd.log": 6, "overlayd.log": 6, "supervisor.log": 6}
ETCD_WARNINGS = 8
# fatal and panic too: an etcd that ends at its start says why only so
ETCD_LEVELS = ("warn", "error", "fatal", "panic")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def free_lan(tag: str) -> IPv4Network:
    """A /24 of 172.31.0.0/16 that no address or route of the host overlaps."""
    with IPRoute() as ip:
        used = [
            IPv4Network(f"{r.get('address')}/{r['prefixlen']}", strict=False)
            for r in ip.get_addr(family=2)
        ]
        used += [
            IPv4Network(f"{r.get('dst')}/{r['dst_len']}", strict=False)
            for r in ip.get_routes(family=2)
            if r.get("dst")
        ]
    blocks = list(LANS.subnets(new_prefix=24))
    start = zlib.crc32(tag.encode()) % len(blocks)
    for block in blocks[start:] + blocks[:start]:
        if not any(block.overlaps(u) for u in used):
            return block
    raise NodeError(f"no /24 of {LANS} is free for a test LAN; remove stale zltc* bridges")


SHARED_SUBNET = IPv4Network("10.90.0.0/16")  # every node's before node init (etcd=False)


def overlay_subnet(index: int) -> IPv4Network:
    """Node ``index``'s own subnet for its replicas, with the harness's etcd."""
    return IPv4Network(f"10.90.{index}.0/24")


class NodeError(Exception):
    """A node that did not come up, in one sentence with where to look."""


class Node:
    """One node of a :class:`Cluster`: its namespace, prefix and daemons."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        tag = cluster.tag
        self.cluster = cluster
        self.index = index
        self.name = f"n{index}"
        self.netns = f"zlt-c{tag}-n{index}"
        self.host_veth = f"zltc{tag}v{index}"
        self.lan = IPv4Interface(f"{cluster.lan.network_address + 10 + index}/24")
        # routed: behind a NAT namespace of its own (its address is then a private one)
        self.behind_nat = index - 1 in cluster.nat
        if cluster.topology == "routed":
            self.lan = cluster.link_address(index + (PRIVATE_BLOCKS if self.behind_nat else 0))
        self.bridge = f"zlb{tag}n{index}"
        # agentd's cgroup_parent: a replica's id is the same on every node, so on one
        # machine a shared parent would make a moved replica's two copies one cgroup
        # (and removing the old copy would kill the new one). "zlayer" in it: the
        # host's leak check still sees what a node leaves.
        self.cgroup_parent = f"zlayer-c{tag}-n{index}"
        # overlayd's setting; its block of the cluster's range replaces it (``subnet``)
        self.start_subnet = overlay_subnet(index) if cluster.etcd else SHARED_SUBNET
        self.mac = f"02:5a:4c:00:00:{index:02x}"  # unique on its cluster's LAN
        self.paths = Paths(cluster.root / self.name)
        self.workdir = cluster.root / f"{self.name}-work"
        self.env = dict(os.environ, **{PREFIX_ENV: str(self.paths.prefix)})
        self.env.pop("ZLAYER_BUS_ADDRESS", None)
        self.process: subprocess.Popen[bytes] | None = None
        self.etcd_process: subprocess.Popen[bytes] | None = None
        self.image_imported = False
        self.seen_containers: set[str] = set()

    @property
    def subnet(self) -> IPv4Network:
        """Its replicas' subnet: its block of the cluster's range once ``node init`` or
        ``node join`` gave it one (its cluster.toml), else overlayd's setting."""
        from shared.cluster import config as cluster_config

        with contextlib.suppress(cluster_config.ClusterConfigError):
            block = cluster_config.block_of(self.paths)
            if block:
                return IPv4Network(block)
        return self.start_subnet

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.lan.ip} {self.paths.prefix}>"

    # ------------------------------------------------------------ commands

    @property
    def uts_path(self) -> Path:
        """Where its UTS namespace (its hostname, the node's name) is kept: beside the
        prefix, not in its run dir, since a hostname outlives a reboot."""
        return self.cluster.root / f"{self.name}.uts"

    def inside(self, *command: str) -> list[str]:
        """``command`` run inside this node's network and UTS namespaces (and no other)."""
        return ["nsenter", f"--net={self.netns_path}", f"--uts={self.uts_path}", "--", *command]

    def sh(
        self,
        *command: str,
        timeout: float = 60,
        check: bool = False,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Any command in this node's network namespace, with its prefix in the environment
        (or ``env``), ``stdin`` as its standard input."""
        result = subprocess.run(
            self.inside(*command),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env,
            cwd=self.workdir,
            check=False,
        )
        if check:
            assert result.returncode == 0, f"{self.name}: {' '.join(command)}: {result.stderr}"
        return result

    def run(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = False,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``zlayerctl ARGS`` against this node (its prefix, so its bus, or ``env``), from
        inside it, ``stdin`` as its standard input."""
        result = self.sh(find_executable("zlayerctl"), *args, timeout=timeout, stdin=stdin, env=env)
        assert "Traceback" not in result.stderr, result.stderr
        if check:
            assert result.returncode == 0, (
                f"{self.name}: zlayerctl {' '.join(args)}: {result.stderr}"
            )
        return result

    # The name tests/e2e's Node gives the same call, so helpers written for it take a node.
    ctl = run

    def ping(self, address: object) -> bool:
        """Whether one ICMP echo from this node to ``address`` is answered within 2 s."""
        from shared.busybox_image import BUSYBOX  # the host has no ping of its own

        return self.sh(str(BUSYBOX), "ping", "-c1", "-W2", str(address)).returncode == 0

    def deployment_name(self, base: str) -> str:
        """A deployment name no other node on this machine uses, so no two clusters'
        replicas have the same id (each node's replicas' cgroups are under a parent of
        its own, see ``cgroup_parent``)."""
        return f"{base}-{self.cluster.tag}{self.name}"

    def spec(self, name: str, body: str) -> Path:
        path = self.workdir / f"{name}.zlayer.yml"
        path.write_text(body)
        return path

    # ------------------------------------------------------------ life

    def start(self) -> None:
        """Boot the node: its namespace on the LAN, then its daemons, until all are ready."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Plug the node into the LAN and start its supervisor, without waiting."""
        assert not self.alive, f"{self.name} is already running"
        self._plug()
        self._write_config()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.paths.log_dir.mkdir(parents=True, exist_ok=True)
        if self.cluster.etcd:
            member = self.etcd_member()
            with (self.paths.log_dir / "etcd.log").open("ab") as log:
                # Its data survives a kill: started again, it rejoins as the same member.
                self.etcd_process = subprocess.Popen(
                    self.inside(*member.argv()),
                    env=member.env(self.env),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
        with (self.paths.log_dir / "supervisor.log").open("ab") as log:
            # Not --detach: the supervisor is then our own child, its PID known.
            self.process = subprocess.Popen(
                self.inside(find_executable("zlayerctl"), "daemon", "run"),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    @property
    def etcd_endpoint(self) -> str:
        return f"http://{self.lan.ip}:{ETCD_CLIENT_PORT}"

    def etcd_member(self) -> EtcdMember:
        """This node's member of the cluster's etcd: on its LAN address (and its own
        loopback, for its daemons), its data in its prefix."""
        from shared.cluster.etcd import EtcdMember

        initial = {
            node.name: f"http://{node.lan.ip}:{ETCD_PEER_PORT}" for node in self.cluster.nodes
        }
        return EtcdMember(
            name=self.name,
            data_dir=self.paths.prefix / "etcd",
            client_urls=(self.etcd_endpoint, f"http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            advertise_client_urls=(self.etcd_endpoint,),
            peer_urls=(f"http://{self.lan.ip}:{ETCD_PEER_PORT}",),
            initial_cluster=initial,
            cluster_token=f"zlayer-test-{self.cluster.tag}",
        )

    def wait_ready(self) -> None:
        """Until the daemons are all ready; on the first boot, then import the test image."""
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NodeError(
                    f"{self.name}'s supervisor exited with code {self.process.returncode}; "
                    f"see {self.paths.log_dir}"
                )
            state = SupervisorState.read(self.paths)
            if state is not None and state.pid == self.process.pid and state.ready:
                break
            time.sleep(0.05)
        else:
            raise NodeError(
                f"{self.name}'s daemons were not ready after {READY_TIMEOUT:.0f}s; "
                f"see {self.paths.log_dir}"
            )
        if not self.image_imported:
            self.run(
                "image", "import", str(self.cluster.image_layout()), "--name", IMAGE, check=True
            )
            self.image_imported = True

    def restart(self) -> None:
        """A reboot: killed outright if still running, then started again on the same disk,
        until ``zlayerctl status`` says every daemon runs."""
        self.kill()
        self.start()
        self.wait_status()
        if self.cluster.etcd:
            self.cluster.wait_etcd([self])

    def wait_status(self, timeout: float = 60) -> None:
        """Until ``zlayerctl status`` exits 0: ready is not yet running everywhere (after a
        reboot proxyd waits a moment for overlayd's bridge to listen on its address)."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.run("status")
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise NodeError(
                    f"{self.name} is not all running after {timeout:.0f}s: {done.stdout}"
                )
            time.sleep(0.5)

    def daemon(self, name: str, timeout: float = 30) -> psutil.Process:
        """One of its daemons (``schedd``) by the PID ``zlayerctl status`` tells, once it
        runs (one being restarted has none yet)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = json.loads(self.run("status", "--format", "json").stdout or "[]")
            pid = int(next((r.get("pid") or 0 for r in rows if r["name"] == name), 0))
            if pid > 0 and _running(pid):
                return psutil.Process(pid)
            assert time.monotonic() < deadline, f"{self.name}'s {name} does not run: {rows}"
            time.sleep(0.2)

    def signal_daemons(self, names: list[str], sig: signal.Signals) -> list[psutil.Process]:
        """Send ``sig`` to some of its daemons (SIGKILL: its supervisor starts them again;
        SIGSTOP: they hang until killed); its etcd member is left alone. The processes."""
        procs = [self.daemon(name) for name in names]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):  # checks it is still that one
                proc.send_signal(sig)
        return procs

    def stop(self, timeout: float = 60) -> None:
        """``zlayerctl daemon stop``: its daemons and etcd member stop, its replicas run
        on (as across an upgrade), its namespace stays; :meth:`start` starts it again."""
        assert self.process is not None
        # daemon stop gives up waiting after 30 s; the supervisor goes on stopping
        self.run("daemon", "stop", timeout=timeout)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log = (self.paths.log_dir / "supervisor.log").read_text(errors="replace")
            raise NodeError(f"{self.name} did not stop in {timeout:.0f}s: {log[-3000:]}") from None

    def kill(self) -> list[str]:
        """Kill the node outright and remove what it held on the machine; what was removed."""
        removed: list[str] = []
        failed: list[str] = []
        # Each step runs even when one before it failed: clean-up must go as far as it can.
        for step in (
            self._kill_processes,
            self._remove_containers,
            self._unplug,
            self._remove_mesh_socket,
        ):
            try:
                removed += step()
            except Exception as exc:
                failed.append(str(exc))
        # /run is a tmpfs on a real machine: a dead node's runtime files die with it.
        shutil.rmtree(self.paths.run_dir, ignore_errors=True)
        if failed:
            raise NodeError(f"{self.name} was not wholly removed: {'; '.join(failed)}")
        return removed

    # ------------------------------------------------------------ the LAN

    def _plug(self) -> None:
        """The namespace, its loopback up, and its veth on the cluster bridge with its address."""
        if self.cluster.topology == "routed":
            self._plug_routed()
            return
        if not self.netns_path.exists():
            netns.create(self.netns)
        if str(self.uts_path) not in self.cluster.mounts_under(self.cluster.root):
            self.uts_path.touch()
            subprocess.run(
                ["unshare", f"--uts={self.uts_path}", "hostname", self.name],
                capture_output=True,
                check=True,
            )
        with IPRoute() as ip:
            if not ip.link_lookup(ifname=self.host_veth):
                ip.link(
                    "add",
                    ifname=self.host_veth,
                    kind="veth",
                    # A NIC keeps its MAC across reboots: the other nodes' ARP caches
                    # stay right when this node comes back.
                    peer={"ifname": LAN_IFACE, "net_ns_fd": self.netns, "address": self.mac},
                )
            index = ip.link_lookup(ifname=self.host_veth)[0]
            bridge = ip.link_lookup(ifname=self.cluster.bridge)[0]
            ip.link("set", index=index, master=bridge, state="up")
        with IPRoute(netns=self.netns) as inner:
            inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
            lan = inner.link_lookup(ifname=LAN_IFACE)[0]
            with contextlib.suppress(NetlinkError):  # already there after a restart
                inner.addr("add", index=lan, address=str(self.lan.ip), prefixlen=24)
            inner.link("set", index=lan, state="up")

    @property
    def nat_netns(self) -> str:
        """The NAT namespace in front of this node (routed, behind NAT)."""
        return f"zlt-c{self.cluster.tag}-nat{self.index}"

    def nat_outside(self) -> IPv4Interface:
        """The outside address of the NAT in front of this node."""
        with IPRoute(netns=self.nat_netns) as nat:
            index = nat.link_lookup(ifname="out0")[0]
            (held,) = [a for a in nat.get_addr(family=2, index=index)]
            return IPv4Interface(f"{held.get_attr('IFA_ADDRESS')}/{held['prefixlen']}")

    def rebind_nat(self) -> IPv4Interface:
        """The NAT in front of this node takes another outside address of its /29 (the
        second and third by turns), as a home router given a new address: the kernel
        drops every mapping masqueraded to the old one with it, so each flow of the
        node leaves from the new address (a new mapping). The outside address now."""
        old = self.nat_outside()
        with IPRoute(netns=self.nat_netns) as nat:
            index = nat.link_lookup(ifname="out0")[0]
            hosts = list(old.network.hosts())
            new = IPv4Interface(f"{hosts[2] if old.ip == hosts[1] else hosts[1]}/{ROUTED_LINK}")
            nat.addr("del", index=index, address=str(old.ip), prefixlen=ROUTED_LINK)
            nat.addr("add", index=index, address=str(new.ip), prefixlen=ROUTED_LINK)
            # the default route went with the old address's subnet route
            nat.route("replace", dst="0.0.0.0/0", gateway=str(hosts[0]))
        return new

    def _uplink(self) -> str:
        """The namespace the node's veth leads to: the router's, or its NAT's."""
        return self.nat_netns if self.behind_nat else self.cluster.router_netns

    def _plug_routed(self) -> None:
        """The namespace and its UTS, its veth to the router (or its NAT) on a /29 of its
        own with the far end as its default route."""
        if not self.netns_path.exists():
            netns.create(self.netns)
        if str(self.uts_path) not in self.cluster.mounts_under(self.cluster.root):
            self.uts_path.touch()
            subprocess.run(
                ["unshare", f"--uts={self.uts_path}", "hostname", self.name],
                capture_output=True,
                check=True,
            )
        uplink = self._uplink()
        gateway = str(next(self.lan.network.hosts()))
        with IPRoute(netns=uplink) as outer:
            if not outer.link_lookup(ifname=self.host_veth):
                outer.link(
                    "add",
                    ifname=self.host_veth,
                    kind="veth",
                    peer={"ifname": LAN_IFACE, "net_ns_fd": self.netns, "address": self.mac},
                )
            far = outer.link_lookup(ifname=self.host_veth)[0]
            with contextlib.suppress(NetlinkError):
                outer.addr("add", index=far, address=gateway, prefixlen=ROUTED_LINK)
            outer.link("set", index=far, state="up")
        with IPRoute(netns=self.netns) as inner:
            inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
            lan = inner.link_lookup(ifname=LAN_IFACE)[0]
            with contextlib.suppress(NetlinkError):
                inner.addr("add", index=lan, address=str(self.lan.ip), prefixlen=ROUTED_LINK)
            inner.link("set", index=lan, state="up")
            with contextlib.suppress(NetlinkError):
                inner.route("add", dst="0.0.0.0/0", gateway=gateway)

    def _unplug(self) -> list[str]:
        removed: list[str] = []
        uplink = NETNS_DIR / self._uplink()
        if self.cluster.topology == "routed" and uplink.exists():
            with IPRoute(netns=uplink.name) as outer:
                for index in outer.link_lookup(ifname=self.host_veth):
                    with contextlib.suppress(NetlinkError):
                        outer.link("del", index=index)
                        removed.append(f"link {self.host_veth}")
        with IPRoute() as ip:
            # Gone with the namespace too, but the kernel removes a namespace's
            # links lazily: delete the pair now so no check sees it linger.
            for index in ip.link_lookup(ifname=self.host_veth):
                with contextlib.suppress(NetlinkError):
                    ip.link("del", index=index)
                    removed.append(f"link {self.host_veth}")
        if self.netns_path.exists():
            netns.remove(self.netns)
            removed.append(f"netns {self.netns}")
        return removed

    def _write_config(self) -> None:
        if self.paths.config_dir.is_dir():
            return  # a restart keeps its configuration
        self.paths.config_dir.mkdir(parents=True)
        for info in DAEMONS:
            self.paths.daemon_config(info.name).write_text("metrics_port = 0\n")
        self.paths.daemon_config("agentd").write_text(
            f'metrics_port = 0\ncgroup_parent = "{self.cgroup_parent}"\n'
        )
        mesh = self.cluster.schedd_cluster_settings(self)
        if mesh:
            self.paths.daemon_config("schedd").write_text(f"metrics_port = 0\n[cluster]\n{mesh}")
        self.paths.daemon_config("overlayd").write_text(
            f'metrics_port = 0\nbridge = "{self.bridge}"\nsubnet = "{self.start_subnet}"\n'
        )
        self.paths.daemon_config("proxyd").write_text("metrics_port = 0\naccess_log = false\n")

    # ------------------------------------------------------------ processes

    def _runtime_lists(self, *flags: str) -> Iterator[str]:
        """``RUNTIME list FLAGS``'s output for each OCI runtime this node's agentd used."""
        for runtime in RUNTIMES:
            root = self.paths.run_dir / "agentd" / runtime
            if root.is_dir() and shutil.which(runtime):
                listed = subprocess.run(
                    [runtime, f"--root={root}", "list", *flags],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                yield listed.stdout

    def containers(self) -> set[str]:
        """Ids of the containers this node's agentd made, by its runtime root and bundles."""
        ids: set[str] = set()
        for listed in self._runtime_lists("-q"):
            ids.update(listed.split())
        bundles = self.paths.daemon_state("agentd") / "bundles"
        if bundles.is_dir():
            ids.update(p.name for p in bundles.iterdir())
        self.seen_containers |= ids
        return ids

    def containers_created(self) -> dict[str, float]:
        """When each container this node's runtime holds was created (epoch seconds): a
        container started again after a moment has a later time."""
        created: dict[str, float] = {}
        for listed in self._runtime_lists("--format=json"):
            for row in json.loads(listed or "[]") or []:
                stamp = row["created"].replace("Z", "+00:00")
                # nanoseconds: datetime takes microseconds at most
                stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp)
                created[row["id"]] = datetime.fromisoformat(stamp).timestamp()
        return created

    def container_cgroups(self) -> list[Path]:
        """The cgroup directories under this node's cgroup parent in every hierarchy,
        deepest first, then the parent itself (all of it is this node's)."""
        found: list[Path] = []
        for parent in CGROUP_ROOT.glob(f"*/{self.cgroup_parent}"):
            with contextlib.suppress(OSError):  # a cgroup removed while we look
                inner = [d for d in parent.rglob("*") if d.is_dir()]
                found += sorted(inner, key=lambda d: len(d.parts), reverse=True)
            if parent.is_dir():
                found.append(parent)
        return found

    def pids(self) -> set[int]:
        """Every process of this node: started by us, carrying its prefix in its
        environment (supervisor, bus, daemons, conmon), inside its namespace, inside
        one of its replicas' namespaces, or under one of its replicas' init."""
        from daemons.overlayd import plumbing

        pids: set[int] = set()
        for started in (self.process, self.etcd_process):
            if started is not None and started.poll() is None:
                pids.add(started.pid)
        pids.update(p.pid for p in prefix_processes(self.paths.prefix))
        containers = self.containers() | self.seen_containers
        namespaces = [self.netns_path]
        namespaces += [plumbing.names_for(self.bridge, cid).netns_path for cid in containers]
        ours: set[int] = set()
        for path in namespaces:
            with contextlib.suppress(OSError):
                ours.add(os.stat(path).st_ino)
        if ours:
            for proc in psutil.process_iter():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{proc.pid}/ns/net").st_ino in ours:
                        pids.add(proc.pid)
        bundles = self.paths.daemon_state("agentd") / "bundles"
        for cid in containers:
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                init = psutil.Process(int((bundles / cid / "ctr.pid").read_text().strip()))
                pids.update(p.pid for p in [init, *init.children(recursive=True)])
        pids.discard(os.getpid())
        return {pid for pid in pids if _running(pid)}

    def memory(self) -> int:
        """Bytes of memory the node's processes use (proportional set size)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_full_info().pss
        return total

    def _kill_processes(self) -> list[str]:
        """Stop first, then kill: a daemon stopped cannot react to its parent's death
        (the supervisor's children get SIGTERM when it goes) or fork a new process."""
        removed: list[str] = []
        for _ in range(20):
            pids = self.pids()
            if not pids:
                break
            procs = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    proc.send_signal(signal.SIGSTOP)
                    procs.append(proc)
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGKILL)
                    removed.append(f"process {proc.pid}")
            _wait_gone(procs, timeout=10)
        else:
            raise AssertionError(f"{self.name}: processes keep appearing: {sorted(self.pids())}")
        for started in (self.process, self.etcd_process):
            if started is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    started.wait(timeout=5)
        return removed

    def _remove_containers(self) -> list[str]:
        """With nothing of the node running: its containers' runtime state, mounts,
        cgroups and network namespaces."""
        from daemons.overlayd import plumbing

        removed: list[str] = []
        ids = self.containers() | self.seen_containers
        for runtime in RUNTIMES:
            root = self.paths.run_dir / "agentd" / runtime
            if not root.is_dir() or shutil.which(runtime) is None:
                continue
            for cid in sorted(ids):
                done = subprocess.run(
                    [runtime, f"--root={root}", "delete", "-f", cid],
                    capture_output=True,
                    check=False,
                )
                if done.returncode == 0:
                    removed.append(f"container {cid}")
        for point in self.cluster.mounts_under(self.paths.prefix):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            removed.append(f"mount {point}")
        for directory in self.container_cgroups():
            with contextlib.suppress(OSError):
                directory.rmdir()
                removed.append(f"cgroup {directory}")
        for cid in sorted(ids):
            removed += plumbing.unplumb(plumbing.names_for(self.bridge, cid))
        return removed

    def _remove_mesh_socket(self) -> list[str]:
        """wireguard-go's control socket, which its killed process leaves on the host
        (the socket directory is the machine's, not the namespace's)."""
        try:
            from daemons.overlayd.mesh import interface_name
            from shared.mesh.uapi import socket_path
        except ImportError:  # an overlayd without the mesh
            return []
        path = socket_path(interface_name(self.bridge))
        if path.exists():
            path.unlink(missing_ok=True)
            return [f"socket {path}"]
        return []

    def leftovers(self) -> list[str]:
        """What of this node is still on the machine (its prefix on disk aside)."""
        from daemons.overlayd import plumbing

        left = [f"process {pid}" for pid in sorted(self.pids())]
        left += [f"netns {self.netns}"] if self.netns_path.exists() else []
        with IPRoute() as ip:
            left += [f"link {self.host_veth}"] if ip.link_lookup(ifname=self.host_veth) else []
        left += [f"mount {p}" for p in self.cluster.mounts_under(self.paths.prefix)]
        left += [f"cgroup {d}" for d in self.container_cgroups()]
        for cid in sorted(self.seen_containers):
            names = plumbing.names_for(self.bridge, cid)
            left += [f"netns {names.netns}"] if names.netns_path.exists() else []
        return left


def _running(pid: int) -> bool:
    """Alive, not a zombie (one killed whose parent has not reaped it yet is gone)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Until each process has exited (a zombie counts: its parent reaps it)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        while time.monotonic() < deadline:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)


class Cluster:
    """N nodes on a shared test LAN; a context manager that always cleans up."""

    def __init__(
        self,
        size: int,
        *,
        etcd: bool = True,
        tag: str = "",
        topology: str = "bridge",
        nat: tuple[int, ...] | list[int] = (),
        mesh: bool = True,
        mesh_keepalive: int | None = None,
    ) -> None:
        assert 1 <= size <= 9, "the harness names nodes n1 to n9"
        assert topology in ("bridge", "routed"), topology
        assert not nat or topology == "routed", "only a routed cluster has nodes behind NAT"
        assert topology == "bridge" or not etcd, "a routed cluster's etcd comes from node init"
        self.topology = topology
        self.nat = tuple(nat)
        self.mesh = mesh
        self.mesh_keepalive = mesh_keepalive
        # "<pid>x<n>": the x ends the pid, so no tag is the start of another.
        self.tag = tag or f"{os.getpid() % 100000}x{next(_sequence)}"
        self._named = re.compile(rf"(zltc|zlt-c|zlb){re.escape(self.tag)}(?![0-9x])")
        self.bridge = f"zltc{self.tag}"
        self.root = ROOTS / f"{ROOT_PREFIX}{self.tag}"
        self.lan = free_lan(self.tag)
        # The host's own address on the LAN: tests reach every node from here.
        self.host_address = IPv4Interface(f"{self.lan.network_address + 1}/24")
        self.router_netns = f"zlt-c{self.tag}-r"
        self.host_link = f"zltc{self.tag}h"
        if topology == "routed":
            self.host_address = IPv4Interface(f"{self.lan.network_address + 1}/{ROUTED_LINK}")
        self.etcd = etcd
        self.nodes = [Node(self, k) for k in range(1, size + 1)]
        self.up_seconds = 0.0
        self.down_seconds = 0.0
        CLUSTERS.append(self)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if error is not None and not isinstance(error, KeyboardInterrupt):
            # the logs go with the cluster: what the test's report shows of them
            print(self.log_tails())
        self.close()

    def log_tails(self) -> str:
        """The last lines of each node's deciding daemons' logs and etcd's warnings, for a
        failed test's report: a failure seen only in CI is read without the cluster."""
        parts: list[str] = []
        for node in self.nodes:
            logs = node.paths.log_dir
            if not logs.is_dir():
                continue
            for name, count in LOG_TAIL.items():
                header = f"-- {self.tag} {node.name} {name}"
                parts += [header, *_read_lines(logs / name)[-count:]]
            warned = [
                line[:400]
                for line in _read_lines(logs / "etcd.log")
                if any(f'"level":"{level}"' in line for level in ETCD_LEVELS)
            ]
            if warned:
                header = f"-- {self.tag} {node.name} etcd.log (warnings)"
                parts += [header, *warned[-ETCD_WARNINGS:]]
        return "\n".join(parts)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def start(self) -> None:
        began = time.monotonic()
        sweep_abandoned()
        self.root.mkdir()
        me = psutil.Process()
        (self.root / OWNER).write_text(f"{me.pid} {me.create_time()}\n")
        if self.topology == "routed":
            self._make_router()
        else:
            with IPRoute() as ip:
                ip.link("add", ifname=self.bridge, kind="bridge")
                index = ip.link_lookup(ifname=self.bridge)[0]
                ip.addr("add", index=index, address=str(self.host_address.ip), prefixlen=24)
                ip.link("set", index=index, state="up")
        self.image_layout()
        # All at once: most of a node's start is its daemons' imports, spread over the cores.
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready()
        if self.etcd:
            self.wait_etcd()
        self.up_seconds = time.monotonic() - began

    # ------------------------------------------------------------ the routed topology

    def link_address(self, block: int) -> IPv4Interface:
        """The second address of /29 number ``block`` of the LAN (the first is the router's,
        or the NAT's): a node's, or a NAT namespace's outside one."""
        link = list(self.lan.subnets(new_prefix=ROUTED_LINK))[block]
        return IPv4Interface(f"{list(link.hosts())[1]}/{ROUTED_LINK}")

    def schedd_cluster_settings(self, node: Node) -> str:
        """The lines of a node's schedd ``[cluster]`` section ("" writes none)."""
        lines = []
        if not self.mesh:
            lines.append("mesh = false")
        if self.mesh_keepalive is not None:
            lines.append(f"mesh_keepalive = {self.mesh_keepalive}")
        return "".join(f"{line}\n" for line in lines)

    def in_router(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``command`` in the router's network namespace (routed)."""
        return subprocess.run(
            ["nsenter", f"--net={NETNS_DIR / self.router_netns}", "--", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _in(self, namespace: str, *command: str, stdin: str | None = None) -> None:
        done = subprocess.run(
            ["nsenter", f"--net={NETNS_DIR / namespace}", "--", *command],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise NodeError(f"{' '.join(command)} in {namespace} failed: {done.stderr.strip()}")

    def _make_router(self) -> None:
        """The router namespace forwarding between the nodes' links, the host's link to
        it (the host reaches the LAN through it), and a NAT namespace in front of each
        node behind NAT (masquerading what leaves it, letting in only the replies)."""
        netns.create(self.router_netns)
        self._in(self.router_netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        router = self.host_address.network
        router_ip = str(list(router.hosts())[1])
        with IPRoute() as ip:
            ip.link(
                "add",
                ifname=self.host_link,
                kind="veth",
                peer={"ifname": "host0", "net_ns_fd": self.router_netns},
            )
            index = ip.link_lookup(ifname=self.host_link)[0]
            ip.addr("add", index=index, address=str(self.host_address.ip), prefixlen=ROUTED_LINK)
            ip.link("set", index=index, state="up")
            ip.route("add", dst=str(self.lan), gateway=router_ip)
        with IPRoute(netns=self.router_netns) as inner:
            inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
            index = inner.link_lookup(ifname="host0")[0]
            inner.addr("add", index=index, address=router_ip, prefixlen=ROUTED_LINK)
            inner.link("set", index=index, state="up")
        for node in self.nodes:
            if node.behind_nat:
                self._make_nat(node)

    def _make_nat(self, node: Node) -> None:
        name = node.nat_netns
        outside = self.link_address(node.index)
        netns.create(name)
        self._in(name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        link = f"zltc{self.tag}o{node.index}"
        gateway = str(next(outside.network.hosts()))
        with IPRoute(netns=self.router_netns) as router:
            router.link("add", ifname=link, kind="veth", peer={"ifname": "out0", "net_ns_fd": name})
            index = router.link_lookup(ifname=link)[0]
            router.addr("add", index=index, address=gateway, prefixlen=ROUTED_LINK)
            router.link("set", index=index, state="up")
        with IPRoute(netns=name) as inner:
            inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
            index = inner.link_lookup(ifname="out0")[0]
            inner.addr("add", index=index, address=str(outside.ip), prefixlen=ROUTED_LINK)
            inner.link("set", index=index, state="up")
            inner.route("add", dst="0.0.0.0/0", gateway=gateway)
        self._in(
            name,
            "nft",
            "-f",
            "-",
            stdin=(
                "table ip nat {\n"
                "  chain masq { type nat hook postrouting priority srcnat; "
                'oifname "out0" masquerade; }\n'
                "}\n"
                "table ip filter {\n"
                "  chain guard { type filter hook forward priority filter; policy drop;\n"
                "    ct state established,related accept\n"
                '    iifname != "out0" accept\n'
                "  }\n"
                "}\n"
            ),
        )

    def _remove_router(self) -> None:
        """The router, NAT namespaces and the host's link to the router, if any."""
        with IPRoute() as ip:
            for index in ip.link_lookup(ifname=self.host_link):
                with contextlib.suppress(NetlinkError):
                    ip.link("del", index=index)
        if NETNS_DIR.is_dir():
            for name in os.listdir(NETNS_DIR):
                if name == self.router_netns or name.startswith(f"zlt-c{self.tag}-nat"):
                    with contextlib.suppress(OSError):
                        netns.remove(name)

    @property
    def etcd_endpoints(self) -> list[str]:
        """Every node's etcd client URL on the LAN."""
        return [node.etcd_endpoint for node in self.nodes]

    def wait_etcd(self, nodes: list[Node] | None = None) -> None:
        """Until each node's etcd member (all by default) answers a linearizable read."""
        from shared.cluster.etcd import wait_healthy

        endpoints = [node.etcd_endpoint for node in nodes or self.nodes]
        asyncio.run(wait_healthy(endpoints, ETCD_HEALTHY_WITHIN))

    def image_layout(self) -> Path:
        """The busybox test image as an OCI layout, written once for every node."""
        from shared.busybox_image import busybox_image, write_oci_layout

        layout = self.root / "image"
        if not (layout / "index.json").is_file():
            write_oci_layout(busybox_image(), layout)
        return layout

    def mounts_under(self, directory: Path) -> list[str]:
        """Mount points under ``directory``, deepest first."""
        with open("/proc/self/mountinfo") as handle:
            points = [line.split()[4] for line in handle]
        inside = [p for p in points if p.startswith(f"{directory}/")]
        return sorted(inside, key=len, reverse=True)

    def close(self) -> None:
        """Kill every node and remove the bridge and the prefixes; never raises for a
        node already gone."""
        began = time.monotonic()
        errors: list[str] = []
        for node in self.nodes:
            try:
                node.kill()
            except Exception as exc:  # the others must still go
                errors.append(f"{node.name}: {exc}")
        with IPRoute() as ip:
            for index in ip.link_lookup(ifname=self.bridge):
                with contextlib.suppress(NetlinkError):
                    ip.link("del", index=index)
        try:
            self._remove_router()
        except Exception as exc:
            errors.append(f"router: {exc}")
        for point in self.mounts_under(self.root):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        if errors and self.root.is_dir():
            # Keep the prefixes (they name the containers whose namespaces and cgroups
            # are left) for the next sweep, which takes a cluster marked unclean.
            (self.root / UNCLEAN).write_text("\n".join(errors) + "\n")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        self.down_seconds = time.monotonic() - began
        assert not errors, f"cluster clean-up failed: {errors}"

    def leftovers(self) -> list[str]:
        """Anything of this cluster still on the machine; empty after :meth:`close`."""
        left = [item for node in self.nodes for item in node.leftovers()]
        with IPRoute() as ip:
            for link in ip.get_links():
                name = str(link.get_attr("IFLA_IFNAME"))
                if self._named.match(name):
                    left.append(f"link {name}")
        if NETNS_DIR.is_dir():
            left += [
                f"netns {n}" for n in os.listdir(NETNS_DIR) if n.startswith(f"zlt-c{self.tag}-")
            ]
        left += [f"mount {p}" for p in self.mounts_under(self.root)]
        if self.root.exists():
            left.append(f"directory {self.root}")
        return sorted(set(left))

    def owns(self, item: str) -> bool:
        """Whether a resource named as the host's leak check names it (a link, a
        namespace, an nft table line, a mount point, a cgroup directory) is this
        cluster's: every name a node makes carries the cluster's tag, is under its
        directory, or is derived from one of its replicas' ids."""
        from daemons.overlayd import plumbing

        if self._named.search(item) or item.startswith(f"{self.root}/"):
            return True
        for node in self.nodes:
            if f"/{node.cgroup_parent}/" in f"{item}/":  # its cgroup parent, or under it
                return True
            for cid in node.seen_containers:
                if item == plumbing.names_for(node.bridge, cid).netns or item.endswith(f"/{cid}"):
                    return True
        return False


def sweep_abandoned() -> list[str]:
    """Remove every cluster whose test process died without closing it (killed by a
    hard timeout, say: its directory names its owner, and the owner is gone) or
    whose clean-up failed. What was removed."""
    removed: list[str] = []
    for root in sorted(ROOTS.glob(f"{ROOT_PREFIX}*")):
        try:
            pid_text, started = (root / OWNER).read_text().split()
            owner = psutil.Process(int(pid_text))
            if abs(owner.create_time() - float(started)) < 0.01 and not (root / UNCLEAN).exists():
                continue  # alive: another test run's, or one still in use
        except (OSError, ValueError):
            continue  # not a cluster's directory, or still being made
        except psutil.NoSuchProcess:
            pass
        size = len([d for d in root.iterdir() if d.is_dir() and d.name[1:].isdigit()])
        abandoned = Cluster(max(size, 1), tag=root.name[len(ROOT_PREFIX) :])
        with contextlib.suppress(Exception):  # another run may be sweeping it too
            abandoned.close()
        removed.append(str(root))
    return removed


def form(cluster: Cluster) -> dict[str, float]:
    """Make the cluster's nodes one ZLayer cluster: ``node init`` on the first, a join
    token from it, ``node join`` on each other (each starts its own etcd member).
    The seconds each node's init or join took, by node name."""
    first, *others = cluster.nodes
    took: dict[str, float] = {}
    began = time.monotonic()
    first.run("node", "init", "--advertise", str(first.lan.ip), check=True)
    took[first.name] = time.monotonic() - began
    token = first.run("node", "join-token", "--ttl", "10m", check=True).stdout.strip()
    for node in others:
        began = time.monotonic()
        node.run("node", "join", token, "--advertise", str(node.lan.ip), check=True)
        took[node.name] = time.monotonic() - began
    return took


def listed_nodes(node: Node) -> dict[str, str]:
    """The cluster's live nodes as ``node`` lists them: name to state, the leader's
    name under the key ``"leader"`` (a dead node's record goes with its lease)."""
    out = node.run("node", "ls", "--format", "json", check=True)
    found = json.loads(out.stdout)
    names = {record["id"]: record["name"] for record in found["nodes"]}
    listed = {record["name"]: record["state"] for record in found["nodes"]}
    listed["leader"] = names.get(found.get("leader") or "", "")
    return listed


def healthy_replicas(node: Node, name: str) -> list[dict[str, Any]]:
    """The replicas of deployment ``name`` that ``node`` itself runs and finds healthy
    (its listing names the other nodes' too, by node id: ``<name>-<suffix>``)."""
    out = node.run("ps", "--containers", "-d", name, "--format", "json", check=True)
    rows = json.loads(out.stdout)
    return [
        r
        for r in rows
        if r["deployment"] == name
        and r["health"] == "healthy"
        and r["node"].rpartition("-")[0] == node.name
    ]


def wait_healthy(nodes: list[Node], name: str, count: int, deadline: float) -> dict[str, Any]:
    """Until ``nodes`` between them run ``count`` healthy replicas of ``name``; by node."""
    while True:
        rows = {node.name: healthy_replicas(node, name) for node in nodes}
        if sum(len(found) for found in rows.values()) == count:
            return rows
        assert time.monotonic() < deadline, f"not {count} healthy replicas: {rows}"
        time.sleep(0.25)


# An http service whose replicas answer with their hostname, spread over the nodes.
SPREAD_WEB = """
version: v1
deployment: {name}
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www
    endpoints: [{{name: http, protocol: http, port: 8080, expose: public}}]
    scale: {{mode: fixed, replicas: {replicas}}}
    affinity: spread
    stop_grace_period: 1s
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""


# A service whose replicas, one a node, each count lines naming their hostname
# (<deployment>-talk-<instance>): what logs and exec across nodes read.
TALK = """
version: v1
deployment: {name}
services:
  talk:
    image: zlayer/busybox:latest
    env:
      GREETING: hello-from-the-spec
    command:
      entrypoint: ["sh", "-c"]
      args:
        - i=0; while true; do i=$((i+1)); echo "line $i of $(hostname)"; sleep 0.2; done
    scale: {{mode: fixed, replicas: 3}}
    affinity: spread
    stop_grace_period: 1s
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: command, command: "true"}}
"""


def talk_lines(out: str, host: str) -> list[int]:
    """The numbers of the lines TALK's replica ``host`` wrote, in the order printed."""
    found = []
    for line in out.splitlines():
        words = line.split()
        if words[-1:] == [host] and "line" in words:
            found.append(int(words[words.index("line") + 1]))
    return found


# An echo server in a replica's network namespace (the host's Python there): each
# connection's lines come back.
ECHO_SERVER = """
import socketserver, sys
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
server = socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), Echo)
print("ready", flush=True)
server.serve_forever()
"""

# One connection from another replica: for each number read on stdin, that many lines
# sent and echoed (0.2 s apart); the total so far printed after each.
ECHO_CLIENT = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
conn.settimeout(60)
reader = conn.makefile("rb")
sent = 0
for line in sys.stdin:
    for _ in range(int(line)):
        sent += 1
        conn.sendall(b"%d\\n" % sent)
        assert reader.readline() == b"%d\\n" % sent, sent
        time.sleep(0.2)
    print(sent, flush=True)
"""


def in_replica(node: Node, row: dict[str, Any]) -> list[str]:
    """The host's Python in the network namespace of ``node``'s replica ``row``."""
    from daemons.overlayd import plumbing

    netns = plumbing.names_for(node.bridge, row["id"]).netns_path
    return ["nsenter", f"--net={netns}", sys.executable]


@contextlib.contextmanager
def long_connection(
    server: tuple[Node, dict[str, Any]], client: tuple[Node, dict[str, Any]], port: int
) -> Iterator[Callable[[int], int]]:
    """An echo server in one replica and one connection to it from another replica,
    kept open: yields ``exchange(count)``, which sends ``count`` more lines over it
    and returns how many were echoed in all. Both processes are killed at the end."""
    listening = subprocess.Popen(
        [*in_replica(*server), "-c", ECHO_SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    connected = None
    try:
        assert listening.stdout is not None and listening.stdout.readline().strip() == "ready"
        connected = subprocess.Popen(
            [*in_replica(*client), "-c", ECHO_CLIENT, server[1]["address"], str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        pipes = (connected.stdin, connected.stdout)

        def exchange(count: int) -> int:
            writer, reader = pipes
            assert writer is not None and reader is not None
            writer.write(f"{count}\n")
            writer.flush()
            return int(reader.readline() or 0)

        yield exchange
    finally:
        for process in (connected, listening):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def echo_once(client: tuple[Node, dict[str, Any]], address: str, port: int, count: int) -> str:
    """A new connection from replica ``client`` to the echo server at ``address``:
    ``count`` lines sent and echoed; what the client printed (``count`` when all came back)."""
    done = subprocess.run(
        [*in_replica(*client), "-c", ECHO_CLIENT, address, str(port)],
        input=f"{count}\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() or done.stderr.strip()


def remove_deployment(node: Node, name: str, timeout: float = 120) -> None:
    """``zlayerctl down name`` from ``node``, then until no live node of its cluster has
    a container of it left: a test on a shared cluster leaves it as it found it."""
    down = node.run("down", name, timeout=timeout)
    assert down.returncode == 0, f"down {name}: {down.stderr}"
    wait_gone(node, name, timeout)


def wait_gone(node: Node, name: str, timeout: float = 120) -> None:
    """Until no live node of ``node``'s cluster has a container of deployment ``name``
    (one already taken down, whose replicas a node stopped meanwhile still has)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {
            other.name: sorted(cid for cid in other.containers() if cid.startswith(f"{name}-"))
            for other in node.cluster
            if other.alive
        }
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, f"{name} still has containers: {left}"
        time.sleep(0.25)
