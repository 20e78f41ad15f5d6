"""Time from "run this" to a running container: a ZLayer deployment on one node.

Starts the six daemons with ``zlayerctl daemon run --detach`` under a fresh
temporary prefix (free ports, its own private dbus-daemon, its own overlayd
bridge and subnet), imports the busybox test image (``shared.busybox_image``)
with ``zlayerctl image import``, and measures two things, each beside peers run
in the same process on the same image content.

1. **Create to running, one replica** (``--runs`` times, default 15; the ways
   take turns, so background load lands on all of them alike):

   - zlayer, ``zlayerctl up -b``: wall time from spawning ``zlayerctl up -b
     FILE`` for a one-replica service running ``sleep 1000`` until agentd
     reports the replica ``running`` (agentd's ``ReplicaChanged`` signal,
     with ``ListReplicas`` polled every 50 ms as a safety net). Once with
     ``network_mode: host`` and once on the node network (bridge and veth
     from overlayd). The ``zlayerctl`` process's own start-up (Python, click
     and the bus client; the spec goes to schedd unread) is inside this figure.
   - zlayer, ``Deploy`` on the bus: the same, but the spec goes straight to
     schedd's ``Deploy`` from this process, no CLI process: what the daemons
     themselves take.
   - raw ``crun run --detach`` of a bundle whose rootfs is the image's
     unpacked layer (a new network namespace with only loopback), until it
     returns (the process runs then).
   - ``podman run -d --rm`` of the same image (``podman load`` of the docker
     archive, podman under its own ``--root/--runroot`` in a temporary
     directory), ``--network none`` and on a bridge network of its own (CNI
     here), until it returns (the container runs then).

   Each run is removed before the next: ``zlayerctl down`` (timed, until
   ``ListReplicas`` is empty), ``crun delete -f``, ``podman rm -f -t 0``.
   The table shows median and p90 in ms, and ratios against raw crun and
   against podman with the matching network (``none`` for crun and
   ``network_mode: host``; the bridge for the node network).

2. **20 replicas to healthy** (``--big-runs`` times, default 3): a service
   with ``scale: {mode: fixed, replicas: 20}`` running busybox ``httpd`` on
   8080 with an http health check every second, on the node network; wall
   time from ``zlayerctl up -b`` until all 20 run and until all 20 are
   healthy, and how long ``zlayerctl down`` takes until no replica is left.
   Peer: 20 x ``podman run -d`` of the same httpd command one after the
   other on podman's bridge, as a user's script would, until the last
   returns (all running); and ``podman rm -f -t 0`` of the 20.

The service specs set ``stop_signal: SIGKILL``: ``sleep`` and ``httpd`` as
PID 1 ignore SIGTERM, so the default stop would wait out the 10 s grace
period and ``down`` would measure that, not ZLayer.

Clean-up, also on an error, Ctrl-C or SIGTERM: deployments taken down, every
container removed by the id it was created with (ZLayer's through agentd's
OCI runtime root under the temporary prefix), overlayd's bridge and nft
table removed (``zlayer-overlayd --remove-network``), podman's network, its
bridge interface, the iptables chains and tables its CNI plugins created
during this run (and only those), its CNI IPAM directory, podman's root
directories, the previous ``net.ipv4.ip_forward``, temporary directories.
Nothing is ever killed by name.

3. **Timeline** (``--timeline N``, before the rest; ``--runs 0 --big-runs 0``
   for it alone): N Deploys on the bus per network, with ``perf trace`` of
   the machine (exec, fork, exit, fsync, mount, unlink) and ``busctl
   monitor`` of the bus running, and each step's median in ms after the
   Deploy call: the reply, SyncAssignments sent, creating, EnsureImageJob,
   Reserve and Attach answered, the root file system mounted, conmon and
   ``crun create`` exec'd, ``crun create`` ended, ``exec.fifo`` released, the container's
   process exec'd, running, SyncAssignments answered, the Deploy job's end;
   and the fsyncs of the last run. Nothing is added to the daemons.

Needs root (containers), crun, conmon, podman and Debian's busybox-static;
perf and busctl for ``--timeline``.

Run: ``.venv/bin/python bench/replica_start.py`` (about 2 minutes);
``--big-runs 0`` measures part 1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import Cluster, percentile, print_table, running_daemons

from ctl.supervisor import SupervisorState, find_executable
from shared.bus import open_bus
from shared.busybox_image import busybox_image, write_docker_archive, write_oci_layout
from shared.clients import AgentClient, SchedulerClient
from shared.paths import Paths
from shared.wire.agent import ReplicaInfo

IMAGE = "zlayer/busybox:latest"
BIG_REPLICAS = 20
POLL = 0.05  # ListReplicas safety-net interval while waiting for a signal
START_TIMEOUT = 60.0
HEALTHY_TIMEOUT = 180.0
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
CNI_STATE = Path("/var/lib/cni/networks")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PODMAN_CGROUP = "libpod_parent"  # podman's parent cgroup under cgroupfs
HTTPD = "mkdir -p /www && echo hello-$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"

SLEEPER = """\
version: v1
deployment: {name}
services:
  sleeper:
    image: {image}
    command: {{entrypoint: [sleep], args: ["1000"]}}
    stop_signal: SIGKILL
{network}"""

WEB = """\
version: v1
deployment: {name}
services:
  web:
    image: {image}
    command:
      entrypoint: [sh, -c]
      args: ["{httpd}"]
    endpoints: [{{name: http, protocol: http, port: 8080}}]
    scale: {{mode: fixed, replicas: {replicas}}}
    stop_signal: SIGKILL
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""


def ms(seconds: float) -> float:
    return seconds * 1000


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """No Ctrl-C or SIGTERM while cleaning up; the previous handlers after."""
    before = (
        signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.signal(signal.SIGTERM, signal.SIG_IGN),
    )
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def _sigterm_to_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run_quiet(
    argv: list[str], timeout: float = 60.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def unmount_under(root: Path) -> None:
    """Unmount every mount point below ``root``, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(f"{root}/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        run_quiet(["umount", "-l", point])


# ---------------------------------------------------------------- addresses


def free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """``count`` /24s in 10.0.0.0/8 that no route on this machine overlaps.

    Podman and buildah default to 10.88.0.0/16 and overlayd to 10.213.0.0/16;
    both are avoided even when nothing routes them right now.
    """
    taken = [ipaddress.IPv4Network("10.88.0.0/16"), ipaddress.IPv4Network("10.213.0.0/16")]
    routes = run_quiet(["ip", "-4", "-j", "route", "show", "table", "all"])
    for route in json.loads(routes.stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.IPv4Network(dst, strict=False))
    chosen: list[ipaddress.IPv4Network] = []
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    while len(chosen) < count:
        net = ipaddress.IPv4Network(f"10.{rng.randint(100, 250)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(other) for other in taken + chosen):
            chosen.append(net)
    return chosen


def links() -> set[str]:
    out = run_quiet(["ip", "-j", "link", "show"]).stdout
    return {link["ifname"] for link in json.loads(out or "[]")}


# ---------------------------------------------------------------- firewall left by podman


def _ruleset() -> list[dict[str, Any]]:
    out = run_quiet(["nft", "-j", "list", "ruleset"]).stdout
    return list(json.loads(out or "{}").get("nftables", []))


@dataclass
class FirewallSnapshot:
    """nftables tables and chains as they were before podman's bridge was used."""

    tables: set[tuple[str, str]]
    chains: set[tuple[str, str, str]]

    @classmethod
    def take(cls) -> FirewallSnapshot:
        tables, chains = set(), set()
        for item in _ruleset():
            if "table" in item:
                tables.add((item["table"]["family"], item["table"]["name"]))
            elif "chain" in item:
                chain = item["chain"]
                chains.add((chain["family"], chain["table"], chain["name"]))
        return cls(tables, chains)

    def remove_new_podman_chains(self) -> list[str]:
        """Drop the CNI-*/NETAVARK* chains (and their jumps) made since; then new empty tables."""
        removed = []
        ruleset = _ruleset()
        ours = set()
        for item in ruleset:
            chain = item.get("chain")
            if not chain:
                continue
            key = (chain["family"], chain["table"], chain["name"])
            if key not in self.chains and chain["name"].startswith(("CNI-", "NETAVARK")):
                ours.add(key)
        for item in ruleset:
            rule = item.get("rule")
            if not rule:
                continue
            targets = {
                verdict.get("target")
                for expr in rule.get("expr", [])
                for verdict in (expr.get("jump"), expr.get("goto"))
                if isinstance(verdict, dict)
            }
            if any((rule["family"], rule["table"], t) in ours for t in targets):
                family, table, chain = rule["family"], rule["table"], rule["chain"]
                run_quiet(
                    ["nft", "delete", "rule", family, table, chain, "handle", str(rule["handle"])]
                )
        for family, table, chain in ours:
            run_quiet(["nft", "flush", "chain", family, table, chain])
        for family, table, chain in ours:
            if run_quiet(["nft", "delete", "chain", family, table, chain]).returncode == 0:
                removed.append(f"chain {family} {table} {chain}")
        # Tables iptables-nft created for them, if nothing else has put a rule there.
        ruleset = _ruleset()
        for family, table in {
            (t["table"]["family"], t["table"]["name"]) for t in ruleset if "table" in t
        } - self.tables:
            if table not in ("nat", "filter", "mangle", "raw"):
                continue
            has_rules = any(
                "rule" in item
                and item["rule"]["family"] == family
                and item["rule"]["table"] == table
                for item in ruleset
            )
            if (
                not has_rules
                and run_quiet(["nft", "delete", "table", family, table]).returncode == 0
            ):
                removed.append(f"table {family} {table}")
        return removed


# ---------------------------------------------------------------- peers


@dataclass
class Peers:
    """Raw crun and podman, in a temporary directory; removes what it created."""

    work: Path
    podman_subnet: ipaddress.IPv4Network
    crun_ids: set[str] = field(default_factory=set)
    podman_ids: set[str] = field(default_factory=set)
    network: str = ""
    bridge: str = ""
    image_id: str = ""
    links_before: set[str] = field(default_factory=set)
    cgroups_before: set[Path] = field(default_factory=set)
    podman_used: bool = False
    firewall: FirewallSnapshot | None = None
    seq: int = 0

    # -- crun

    @property
    def crun_root(self) -> Path:
        return self.work / "crun-state"

    @property
    def bundle(self) -> Path:
        return self.work / "bundle"

    def prepare_crun(self, layer: bytes) -> None:
        crun = shutil.which("crun")
        if crun is None:
            raise FileNotFoundError("crun is not installed (apt-get install crun)")
        rootfs = self.bundle / "rootfs"
        rootfs.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            tar.extractall(rootfs, filter="fully_trusted")
        subprocess.run([crun, "spec"], cwd=self.bundle, check=True, capture_output=True)
        config = json.loads((self.bundle / "config.json").read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = ["sleep", "1000"]
        config["hostname"] = "crun-peer"
        (self.bundle / "config.json").write_text(json.dumps(config))
        self.crun_root.mkdir()

    def crun_run(self) -> float:
        self.seq += 1
        cid = f"zlbench-{os.getpid()}-{self.seq}"
        self.crun_ids.add(cid)
        argv = [
            "crun",
            f"--root={self.crun_root}",
            "run",
            "--detach",
            "--bundle",
            str(self.bundle),
            cid,
        ]
        # The container inherits crun's stdio: a pipe would stay open while it runs.
        errors = self.work / "crun-run.err"
        with errors.open("w") as err:
            start = time.perf_counter()
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=START_TIMEOUT,
                check=False,
            )
            taken = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"crun run failed: {errors.read_text().strip()}")
        self.crun_delete(cid)
        return taken

    def crun_delete(self, cid: str) -> None:
        run_quiet(["crun", f"--root={self.crun_root}", "delete", "-f", cid])
        self.crun_ids.discard(cid)

    # -- podman

    @property
    def podman_env(self) -> dict[str, str]:
        return dict(os.environ, CONTAINERS_CONF=str(self.work / "containers.conf"))

    def podman(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        base = [
            "podman",
            "--root",
            str(self.work / "podman-root"),
            "--runroot",
            str(self.work / "podman-run"),
            "--tmpdir",
            str(self.work / "podman-tmp"),
            "--network-config-dir",
            str(self.work / "podman-net"),
            "--storage-driver",
            "overlay",
        ]
        return run_quiet([*base, *args], timeout=timeout, env=self.podman_env)

    def prepare_podman(self) -> None:
        if shutil.which("podman") is None:
            raise FileNotFoundError("podman is not installed (apt-get install podman)")
        # The hard open-files limit here is 20000; podman's default asks for more.
        (self.work / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]\n'
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "none"\n'
        )
        (self.work / "podman-net").mkdir()
        self.podman_used = True
        self.cgroups_before = set(CGROUP_ROOT.glob(f"*/{PODMAN_CGROUP}"))
        archive = write_docker_archive(busybox_image(), self.work / "docker-archive.tar")
        loaded = self.podman("load", "-q", "-i", str(archive))
        if loaded.returncode != 0:
            raise RuntimeError(f"podman load failed: {loaded.stderr.strip()}")
        listed = self.podman("images", "-q", "--no-trunc")
        self.image_id = listed.stdout.split()[0]
        self.links_before = links()
        self.firewall = FirewallSnapshot.take()
        self.network = f"zlbench{os.getpid()}"
        created = self.podman(
            "network", "create", "--disable-dns", "--subnet", str(self.podman_subnet), self.network
        )
        if created.returncode != 0:
            raise RuntimeError(f"podman network create failed: {created.stderr.strip()}")
        inspect = json.loads(self.podman("network", "inspect", self.network).stdout)
        self.bridge = inspect[0].get("network_interface", "")

    def podman_run(self, network: str, command: list[str]) -> tuple[float, str]:
        start = time.perf_counter()
        result = self.podman("run", "-d", "--rm", "--network", network, self.image_id, *command)
        taken = time.perf_counter() - start
        cid = result.stdout.strip()
        if cid:
            self.podman_ids.add(cid)
        if result.returncode != 0:
            raise RuntimeError(f"podman run failed: {result.stderr.strip()}")
        return taken, cid

    def podman_rm(self, ids: list[str]) -> float:
        start = time.perf_counter()
        self.podman("rm", "-f", "-i", "-t", "0", *ids)
        taken = time.perf_counter() - start
        self.podman_ids.difference_update(ids)
        return taken

    # -- clean-up

    def cleanup(self) -> list[str]:
        """Remove everything this object created; what was removed, for the log."""
        done = []
        for cid in sorted(self.crun_ids):
            self.crun_delete(cid)
            done.append(f"crun container {cid}")
        if self.podman_ids:
            ids = sorted(self.podman_ids)
            self.podman_rm(ids)
            done.append(f"{len(ids)} podman containers")
        if self.network:
            self.podman("network", "rm", "-f", self.network)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(CNI_STATE / self.network)
            done.append(f"podman network {self.network}")
            self.network = ""
        if self.bridge and self.bridge not in self.links_before and self.bridge in links():
            run_quiet(["ip", "link", "delete", self.bridge])
            done.append(f"bridge {self.bridge}")
        self.bridge = ""
        # podman's parent cgroups, if this run made them and they are empty now.
        made = set(CGROUP_ROOT.glob(f"*/{PODMAN_CGROUP}")) - self.cgroups_before
        for parent in made if self.podman_used else set():
            for directory in sorted(parent.glob("**/"), key=lambda d: len(d.parts), reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            if not parent.exists():
                done.append(f"cgroup {parent}")
        if self.firewall is not None:
            done += self.firewall.remove_new_podman_chains()
            self.firewall = None
        self.podman_used = False
        return done


# ---------------------------------------------------------------- zlayer


class Agent:
    """agentd's replicas as this process sees them: signals, with polling as a net."""

    def __init__(self, address: str) -> None:
        self.bus = open_bus(address)
        self.agent = AgentClient(self.bus)
        self.schedd = SchedulerClient(self.bus)
        self.replicas: dict[str, ReplicaInfo] = {}
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._listen())
        await asyncio.sleep(0.1)  # the match rule is in place

    async def _listen(self) -> None:
        async for info in self.agent.replica_changes():
            self.replicas[info.id] = info
            self.changed.set()

    async def poll(self, deployment: str) -> list[ReplicaInfo]:
        now = await self.agent.list_replicas(deployment)
        for stale in [k for k, v in self.replicas.items() if v.deployment == deployment]:
            del self.replicas[stale]
        for info in now:
            self.replicas[info.id] = info
        return now

    async def wait_for(
        self, deployment: str, done: Callable[[list[ReplicaInfo]], bool], timeout: float
    ) -> float:
        """perf_counter() when ``done`` first held for the deployment's replicas."""
        deadline = time.monotonic() + timeout
        while True:
            current = [r for r in self.replicas.values() if r.deployment == deployment]
            if done(current):
                return time.perf_counter()
            broken = [r for r in current if r.state in ("failed", "exited")]
            if broken:
                raise RuntimeError(f"{broken[0].id} is {broken[0].state}: {broken[0].message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{deployment}: still {[(r.state, r.health) for r in current]}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), POLL)
            except TimeoutError:
                await self.poll(deployment)

    async def wait_gone(self, deployment: str, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while await self.poll(deployment):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{deployment}: replicas still there after down")
            await asyncio.sleep(0.01)
        return time.perf_counter()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        self.bus.close()


async def zlayerctl(cluster: Cluster, *args: str) -> tuple[float, str]:
    """(perf_counter() when it exited, stderr); raises when it failed."""
    proc = await asyncio.create_subprocess_exec(
        find_executable("zlayerctl"),
        *args,
        env=cluster.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _out, err = await proc.communicate()
    ended = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"zlayerctl {' '.join(args)}: {err.decode().strip()}")
    return ended, err.decode()


@dataclass
class Zlayer:
    cluster: Cluster
    agent: Agent
    specs: Path
    deployed: set[str] = field(default_factory=set)
    seq: int = 0

    def write(self, name: str, text: str) -> Path:
        path = self.specs / f"{name}.zlayer.yml"
        path.write_text(text)
        return path

    async def one_replica(self, network: str, via_bus: bool) -> tuple[float, float, float]:
        """(to running, of which the CLI process, down until gone), seconds."""
        self.seq += 1
        name = f"rs{network[0]}{self.seq}"
        line = "    network_mode: host\n" if network == "host" else ""
        text = SLEEPER.format(name=name, image=IMAGE, network=line)
        path = self.write(name, text)
        running = lambda rs: any(r.state == "running" for r in rs)  # noqa: E731
        self.deployed.add(name)
        start = time.perf_counter()
        if via_bus:
            await self.agent.schedd.deploy(text, str(path), {})
            cli = 0.0
            ready = await self.agent.wait_for(name, running, START_TIMEOUT)
        else:
            up = asyncio.create_task(zlayerctl(self.cluster, "up", "-b", str(path)))
            ready = await self.agent.wait_for(name, running, START_TIMEOUT)
            cli = (await up)[0] - start
        down = await self.down(name)
        return ready - start, cli, down

    async def down(self, name: str) -> float:
        start = time.perf_counter()
        await zlayerctl(self.cluster, "down", name)
        gone = await self.agent.wait_gone(name)
        self.deployed.discard(name)
        return gone - start

    async def twenty(self) -> tuple[float, float, float]:
        """(all running, all healthy, down until gone), seconds."""
        self.seq += 1
        name = f"rsweb{self.seq}"
        text = WEB.format(name=name, image=IMAGE, httpd=HTTPD, replicas=BIG_REPLICAS)
        path = self.write(name, text)
        self.deployed.add(name)
        start = time.perf_counter()
        up = asyncio.create_task(zlayerctl(self.cluster, "up", "-b", str(path)))
        running = await self.agent.wait_for(
            name,
            lambda rs: sum(r.state == "running" for r in rs) >= BIG_REPLICAS,
            HEALTHY_TIMEOUT,
        )
        healthy = await self.agent.wait_for(
            name,
            lambda rs: sum(r.health == "healthy" for r in rs) >= BIG_REPLICAS,
            HEALTHY_TIMEOUT,
        )
        await up
        down = await self.down(name)
        return running - start, healthy - start, down

    async def down_all(self) -> None:
        for name in sorted(self.deployed):
            with contextlib.suppress(Exception):
                await self.down(name)


# ---------------------------------------------------------------- the timeline

PERF_EVENTS = (
    "sched:sched_process_exec,sched:sched_process_fork,sched:sched_process_exit,"
    "fsync,fdatasync,mount,unlink,unlinkat"
)
PERF_LINE = re.compile(
    r"^\s*(?P<at>\d+\.\d+) \(\s*(?P<took>[\d.]+)?\s*(?:ms)?\): (?P<comm>.*?)/(?P<tid>\d+) "
    r"(?P<rest>.*)$"
)
# The steps of one Deploy, in the order they happen; each in ms after the Deploy call.
TIMELINE = (
    "Deploy reply (revision stored)",
    "SyncAssignments sent to agentd",
    "replica creating (ReplicaChanged)",
    "EnsureImageJob answered",
    "Reserve answered (address, empty netns)",
    "Attach answered (veth, address, route)",
    "rootfs mounted (bundle written)",
    "conmon exec'd",
    "crun create exec'd",
    "crun create ended",
    "exec.fifo released (start)",
    "container process exec'd",
    "replica running (ReplicaChanged)",
    "SyncAssignments answered",
    "Deploy job done (JobRemoved)",
)


class Tracer:
    """``perf trace`` of the whole machine (exec, fork, exit, fsync, mount, unlink) and
    ``busctl monitor`` of the daemons' bus, each into a file, read once stopped.

    Nothing is added to the daemons: what they do is read from the kernel and the bus.
    perf's clock is CLOCK_MONOTONIC; the bus's timestamps are wall clock.
    """

    def __init__(self, cluster: Cluster, work: Path) -> None:
        for tool in ("perf", "busctl"):
            if shutil.which(tool) is None:
                raise FileNotFoundError(
                    f"--timeline needs {tool}; install it (apt-get install "
                    f"{'linux-perf' if tool == 'perf' else 'systemd'})"
                )
        self.perf_path = work / "perf.txt"
        self.bus_path = work / "bus.json"
        self.bus_out = self.bus_path.open("w")
        state = SupervisorState.read(cluster.paths) or cluster.state
        self.pids = {name: child.pid for name, child in state.daemons.items()}
        self.wall_offset = time.time() - time.monotonic()
        self.perf = subprocess.Popen(
            ["perf", "trace", "-T", "--comm", "-o", str(self.perf_path), "-e", PERF_EVENTS],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.busctl = subprocess.Popen(
            ["busctl", f"--address={cluster.bus_address}", "monitor", "--json=short"],
            stdout=self.bus_out,
            stderr=subprocess.DEVNULL,
        )
        # The daemons' threads now; those made later are seen forking.
        self.tasks: dict[int, str] = {}
        for name in ("schedd", "agentd"):
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{self.pids[name]}/task"):
                    self.tasks[int(task)] = name
        self.work = work
        self.marks: list[float] = []
        time.sleep(1.0)  # both subscribed

    def _mark(self) -> None:
        """perf's clock is milliseconds off CLOCK_MONOTONIC (8 ms here): this process's
        own fsyncs, made at known moments while perf surely runs, give the offset."""
        self.tasks[os.getpid()] = "bench"
        with tempfile.TemporaryFile(dir=self.work) as handle:
            for _ in range(5):
                self.marks.append(time.monotonic())
                os.fsync(handle.fileno())
        time.sleep(0.2)

    def stop(self) -> tuple[list[tuple[float, float, str, int, str, str]], list[dict[str, Any]]]:
        """(perf events as (monotonic s, took ms, comm, tid, daemon, event), bus messages)."""
        if self.perf.poll() is None:
            self._mark()
        for process in (self.perf, self.busctl):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.bus_out.close()
        messages = []
        for line in self.bus_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                messages.append(json.loads(line))
        events = []
        started: dict[tuple[int, str], float] = {}
        for line in self.perf_path.read_text(errors="replace").splitlines():
            found = PERF_LINE.match(line)
            if found is None:
                continue
            at, tid, rest = float(found["at"]) / 1000, int(found["tid"]), found["rest"]
            took = float(found["took"]) if found["took"] else 0.0
            if rest.startswith("sched:sched_process_fork"):
                child = re.search(r"child_pid: (\d+)", rest)
                if child and tid in self.tasks:
                    self.tasks[int(child.group(1))] = self.tasks[tid]
                continue
            if tid not in self.tasks:
                continue
            name = rest.split("(", 1)[0].strip()
            if name.startswith("..."):  # a syscall cut in two: "... [continued]: fsync()"
                call = re.search(r"\[continued\]: (\w+)", rest)
                if call is None:
                    continue
                name = call.group(1)
                at = started.pop((tid, name), at)
            elif not found["took"] and not name.startswith("sched:"):
                started[(tid, name)] = at
                continue
            if name == "sched:sched_process_exec":
                exe = re.search(r'filename: "([^"]*)"', rest)
                name = f"exec {Path(exe.group(1)).name if exe else '?'}"
            elif name == "sched:sched_process_exit":
                name = "exit"
            events.append((at, took, found["comm"].strip(), tid, self.tasks[tid], name))
        seen = [e[0] for e in events if e[4] == "bench" and e[5] == "fsync"][: len(self.marks)]
        if len(seen) == len(self.marks):
            offset = statistics.median(at - mark for at, mark in zip(seen, self.marks, strict=True))
            events = [(e[0] - offset, e[1], e[2], e[3], e[4], e[5]) for e in events]
        return events, messages


@dataclass
class TracedRun:
    name: str
    network: str
    called: float  # time.monotonic() just before Deploy was called
    until: float  # ... the end of the run's window


def run_steps(
    run: TracedRun,
    events: list[tuple[float, float, str, int, str, str]],
    messages: list[dict[str, Any]],
    wall_offset: float,
    pids: dict[str, int],
) -> tuple[dict[str, float], list[str]]:
    """The run's steps in ms after the Deploy call, and its fsyncs ("schedd 3.1 ms at 12.0")."""
    steps: dict[str, float] = {}

    def ms_after(monotonic: float) -> float:
        return (monotonic - run.called) * 1000

    def bus_at(message: dict[str, Any]) -> float:
        return float(message["timestamp-realtime"]) / 1e6 - wall_offset

    calls = {(m.get("sender"), m.get("cookie")): m for m in messages if m["type"] == "method_call"}
    for message in messages:
        at = bus_at(message)
        if not run.called - 0.01 <= at <= run.until:
            continue
        member, kind = message.get("member", ""), message["type"]
        payload = json.dumps(message.get("payload", {}))
        if kind == "signal" and member == "ReplicaChanged" and f'\\"{run.name}\\"' in payload:
            if '\\"state\\":\\"creating\\"' in payload:
                steps.setdefault(TIMELINE[2], ms_after(at))
            if '\\"state\\":\\"running\\"' in payload:
                steps.setdefault(TIMELINE[12], ms_after(at))
        elif kind == "signal" and member == "JobRemoved" and run.name in payload:
            steps.setdefault(TIMELINE[14], ms_after(at))
        elif kind == "method_call" and member == "SyncAssignments" and run.name in payload:
            steps.setdefault(TIMELINE[1], ms_after(at))
        elif kind == "method_return":
            call = calls.get((message.get("destination"), message.get("reply_cookie")))
            if call is None:
                continue
            called = json.dumps(call.get("payload", {}))
            what = call.get("member")
            if what == "Deploy" and run.name in called:
                steps.setdefault(TIMELINE[0], ms_after(at))
            elif what == "EnsureImageJob" and TIMELINE[2] in steps:
                steps.setdefault(TIMELINE[3], ms_after(at))
            elif what == "Reserve" and f'"{run.name}-' in called:
                steps.setdefault(TIMELINE[4], ms_after(at))
            elif what == "Attach" and f'"{run.name}-' in called:
                steps.setdefault(TIMELINE[5], ms_after(at))
            elif what == "SyncAssignments" and run.name in called:
                steps.setdefault(TIMELINE[13], ms_after(at))
    syncs = []
    crun_tid = 0
    for at, took, comm, tid, daemon, name in events:
        if not run.called <= at <= run.until:
            continue
        if name in ("fsync", "fdatasync") and comm not in ("conmon", "crun"):
            # perf gives no sane duration for some calls cut in two
            took_text = f"{took:.1f} ms" if took < 1e6 else "?"
            syncs.append(f"{daemon} {name} {took_text} at {ms_after(at):.1f}")
        elif name == "mount" and daemon == "agentd":
            steps.setdefault(TIMELINE[6], ms_after(at))
        elif name == "exec conmon":
            steps.setdefault(TIMELINE[7], ms_after(at))
        elif name == "exec crun" and TIMELINE[7] in steps:
            if TIMELINE[8] not in steps:
                crun_tid = tid
            steps.setdefault(TIMELINE[8], ms_after(at))
        elif name == "exit" and tid == crun_tid:
            steps.setdefault(TIMELINE[9], ms_after(at))
        elif name in ("unlink", "unlinkat") and tid == pids.get("agentd") and TIMELINE[9] in steps:
            steps.setdefault(TIMELINE[10], ms_after(at))
        elif name == "exec sleep" and TIMELINE[8] in steps:
            steps.setdefault(TIMELINE[11], ms_after(at))
    return steps, syncs


async def timeline(cluster: Cluster, zl: Zlayer, work: Path, runs: int) -> None:
    """``runs`` Deploys on the bus per network, traced; each step's median."""
    tracer = Tracer(cluster, work)
    traced: list[TracedRun] = []
    try:
        for _ in range(runs):
            for network in ("host", "bridge"):
                zl.seq += 1
                name = f"rst{network[0]}{zl.seq}"
                line = "    network_mode: host\n" if network == "host" else ""
                text = SLEEPER.format(name=name, image=IMAGE, network=line)
                path = zl.write(name, text)
                zl.deployed.add(name)
                running = lambda rs: any(r.state == "running" for r in rs)  # noqa: E731
                called = time.monotonic()
                await zl.agent.schedd.deploy(text, str(path), {})
                await zl.agent.wait_for(name, running, START_TIMEOUT)
                await asyncio.sleep(0.5)  # the job's end and the last replies
                traced.append(TracedRun(name, network, called, time.monotonic()))
                await zl.down(name)
    finally:
        events, messages = tracer.stop()
    for network in ("host", "bridge"):
        mine = [r for r in traced if r.network == network]
        found = [run_steps(r, events, messages, tracer.wall_offset, tracer.pids) for r in mine]
        print()
        print(
            "timeline of a Deploy on the bus, "
            f"{'network_mode: host' if network == 'host' else 'node network'}"
            f" ({len(mine)} runs; ms after the Deploy call, median)"
        )
        rows = []
        for step in TIMELINE:
            seen = [steps[step] for steps, _ in found if step in steps]
            if seen:
                rows.append([step, str(len(seen)), f"{statistics.median(seen):.1f}",
                             f"{min(seen):.1f}", f"{max(seen):.1f}"])  # fmt: skip
        print_table(["step", "runs", "median", "min", "max"], rows)
        if found:
            print("fsyncs of the last run:", "; ".join(found[-1][1]) or "none")


def zlayer_leftovers(paths: Paths, env: dict[str, str]) -> None:
    """After the daemons stopped: containers agentd's runtimes still hold, mounts, network."""
    for runtime in ("crun", "runc"):
        root = paths.run_dir / "agentd" / runtime
        if not root.is_dir() or shutil.which(runtime) is None:
            continue
        listed = run_quiet([runtime, f"--root={root}", "list", "-q"])
        for cid in listed.stdout.split():
            print(f"removing leftover container {cid}", file=sys.stderr)
            run_quiet([runtime, f"--root={root}", "delete", "-f", cid])
    unmount_under(paths.prefix)
    removed = run_quiet([find_executable("zlayer-overlayd"), "--remove-network"], env=env)
    if removed.returncode != 0:
        print(f"zlayer-overlayd --remove-network: {removed.stderr.strip()}", file=sys.stderr)


# ---------------------------------------------------------------- the run


def row(what: str, samples: list[float], crun: float, podman: float | None) -> list[str]:
    p50, p90 = percentile(samples, 50), percentile(samples, 90)
    return [
        what,
        str(len(samples)),
        f"{ms(p50):.1f}",
        f"{ms(p90):.1f}",
        f"{p50 / crun:.1f}x",
        f"{p50 / podman:.2f}x" if podman else "-",
    ]


async def measure(
    cluster: Cluster, peers: Peers, work: Path, runs: int, big_runs: int, timeline_runs: int = 0
) -> None:
    image = busybox_image()
    oci = write_oci_layout(image, work / "oci")
    imported = cluster.zlayerctl("image", "import", str(oci), "--name", IMAGE)
    if imported.returncode != 0:
        raise RuntimeError(f"zlayerctl image import: {imported.stderr.strip()}")
    if runs > 0:
        peers.prepare_crun(image.layers[0])
        peers.prepare_podman()
    agent = Agent(cluster.bus_address)
    await agent.start()
    specs = work / "specs"
    specs.mkdir()
    zl = Zlayer(cluster, agent, specs)
    sleep = ["sleep", "1000"]

    def podman_once(network: str) -> float:
        taken, cid = peers.podman_run(network, sleep)
        peers.podman_rm([cid])
        return taken

    samples: dict[str, list[float]] = {}
    extra: dict[str, list[float]] = {}
    ways: dict[str, Callable[[], Any]] = {
        "crun": lambda: peers.crun_run(),
        "podman none": lambda: podman_once("none"),
        "podman bridge": lambda: podman_once(peers.network),
        "zlayer host cli": lambda: zl.one_replica("host", via_bus=False),
        "zlayer host bus": lambda: zl.one_replica("host", via_bus=True),
        "zlayer bridge cli": lambda: zl.one_replica("bridge", via_bus=False),
        "zlayer bridge bus": lambda: zl.one_replica("bridge", via_bus=True),
    }
    try:
        if timeline_runs:
            print(f"timeline: {timeline_runs} traced Deploys per network", file=sys.stderr)
            await timeline(cluster, zl, work, timeline_runs)
        if runs < 1:
            return
        print(f"part 1: {runs} runs of each way, taking turns (plus one warm-up)", file=sys.stderr)
        for attempt in range(runs + 1):
            for what, way in ways.items():
                result = way()
                if asyncio.iscoroutine(result):
                    result = await result
                if attempt == 0:
                    continue
                if isinstance(result, tuple):
                    taken, cli, down = result
                    samples.setdefault(what, []).append(taken)
                    extra.setdefault(what + " cli", []).append(cli)
                    extra.setdefault(what + " down", []).append(down)
                else:
                    samples.setdefault(what, []).append(result)
            print(f"  run {attempt}/{runs} done", file=sys.stderr)

        crun = percentile(samples["crun"], 50)
        none = percentile(samples["podman none"], 50)
        bridge = percentile(samples["podman bridge"], 50)
        print()
        print("1. create to running, one replica running `sleep 1000` (busybox image)")
        print_table(
            ["what", "runs", "median ms", "p90 ms", "vs crun", "vs podman"],
            [
                row("raw crun run --detach (new netns, lo only)", samples["crun"], crun, none),
                row("podman run -d --rm --network none", samples["podman none"], crun, none),
                row("podman run -d --rm, bridge (CNI)", samples["podman bridge"], crun, bridge),
                row("zlayer up -b, network_mode: host", samples["zlayer host cli"], crun, none),
                row("zlayer Deploy on the bus, host", samples["zlayer host bus"], crun, none),
                row("zlayer up -b, node network", samples["zlayer bridge cli"], crun, bridge),
                row(
                    "zlayer Deploy on the bus, node network",
                    samples["zlayer bridge bus"],
                    crun,
                    bridge,
                ),
            ],
        )
        print(
            "vs podman: against podman --network none for crun and host rows, "
            "against podman's bridge for the node network rows"
        )
        print()
        print_table(
            ["of which / after", "median ms", "p90 ms"],
            [
                [
                    label,
                    f"{ms(percentile(extra[key], 50)):.1f}",
                    f"{ms(percentile(extra[key], 90)):.1f}",
                ]
                for label, key in (
                    ("zlayerctl up -b process, host", "zlayer host cli cli"),
                    ("zlayerctl up -b process, node network", "zlayer bridge cli cli"),
                    ("zlayerctl down until gone, host", "zlayer host cli down"),
                    ("zlayerctl down until gone, node network", "zlayer bridge cli down"),
                )
            ],
        )

        if big_runs < 1:
            return
        print(f"\npart 2: {big_runs} runs of {BIG_REPLICAS} replicas", file=sys.stderr)
        big: dict[str, list[float]] = {}
        for attempt in range(big_runs):
            running, healthy, down = await zl.twenty()
            big.setdefault("running", []).append(running)
            big.setdefault("healthy", []).append(healthy)
            big.setdefault("down", []).append(down)
            start = time.perf_counter()
            ids = []
            for _ in range(BIG_REPLICAS):
                ids.append(peers.podman_run(peers.network, ["sh", "-c", HTTPD])[1])
            big.setdefault("podman", []).append(time.perf_counter() - start)
            big.setdefault("podman rm", []).append(peers.podman_rm(ids))
            print(f"  run {attempt + 1}/{big_runs} done", file=sys.stderr)
        podman20 = percentile(big["podman"], 50)
        podman_rm = percentile(big["podman rm"], 50)

        def line(what: str, key: str, peer: float) -> list[str]:
            taken = big[key]
            return [
                what,
                str(len(taken)),
                f"{ms(percentile(taken, 50)):.0f}",
                f"{ms(max(taken)):.0f}",
                f"{percentile(taken, 50) / peer:.2f}x",
            ]

        print()
        print(f"2. {BIG_REPLICAS} replicas of busybox httpd, node network / podman bridge")
        print_table(
            ["what", "runs", "median ms", "max ms", "vs podman"],
            [
                line(f"zlayer up -b to all {BIG_REPLICAS} running", "running", podman20),
                line(
                    f"zlayer up -b to all {BIG_REPLICAS} healthy (1s http check)",
                    "healthy",
                    podman20,
                ),
                line(
                    f"{BIG_REPLICAS} x podman run -d, sequential, to all running",
                    "podman",
                    podman20,
                ),
                line("zlayerctl down until no replica is left", "down", podman_rm),
                line(f"podman rm -f -t 0 of the {BIG_REPLICAS}", "podman rm", podman_rm),
            ],
        )
        print("vs podman: up rows against the 20 podman runs, down against podman rm")
    finally:
        with signals_ignored():
            await zl.down_all()
            await agent.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="one-replica runs per way")
    parser.add_argument(
        "--big-runs", type=int, default=3, help=f"{BIG_REPLICAS}-replica runs (0: none)"
    )
    parser.add_argument(
        "--timeline",
        type=int,
        default=0,
        metavar="N",
        help="first, N Deploys on the bus per network traced (perf trace, busctl monitor): "
        "each step's time",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("running containers needs root")
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    forward_before = IP_FORWARD.read_text().strip()
    work = Path(tempfile.mkdtemp(prefix="zlrs-", dir="/tmp"))
    zl_net, podman_net = free_subnets(2)
    bridge = f"zlb{os.getpid() % 100000}"
    overlay = f'bridge = "{bridge}"\nsubnet = "{zl_net}"\n'
    peers = Peers(work, podman_net)
    code = 0
    try:
        with running_daemons({"overlayd": overlay}, zlayer_leftovers) as cluster:
            try:
                asyncio.run(measure(cluster, peers, work, args.runs, args.big_runs, args.timeline))
            finally:
                with signals_ignored():
                    for what in peers.cleanup():
                        print(f"removed {what}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        code = 130
    except FileNotFoundError as exc:  # a peer tool is missing: one sentence, not a traceback
        print(f"replica_start: {exc}", file=sys.stderr)
        code = 1
    finally:
        with signals_ignored():
            peers.cleanup()
            unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)
            if IP_FORWARD.read_text().strip() != forward_before:
                IP_FORWARD.write_text(forward_before + "\n")
                print(f"net.ipv4.ip_forward restored to {forward_before}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
