"""zlayer-overlayd on a real private bus, with real namespaces, veths, a bridge and nftables.

Each test gets its own bridge name and subnet (written to its prefix's
overlayd.toml), so tests never see each other's network, and ends with
``zlayer-overlayd --remove-network`` so the leak check finds nothing left:
no link, namespace, nft table or mount.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ctl.supervisor import find_executable
from daemons.overlayd import plumbing
from shared.bus import UnavailableError, open_bus
from shared.busdaemon import PrivateBus
from shared.clients import OverlayClient
from shared.paths import Paths
from shared.wire.daemon import DaemonStatus
from shared.wire.overlay import Attachment, NetworkInfo
from tests.integration.test_daemon import NotifyListener, start, stop

_missing = [tool for tool in ("ip", "nft", "busybox") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, veths and nftables need root"),
    pytest.mark.skipif(
        bool(_missing),
        reason=f"missing {', '.join(_missing)} (apt-get install iproute2 nftables busybox-static)",
    ),
]

_counter = itertools.count()
T = TypeVar("T")


def _network_for_test() -> tuple[str, IPv4Network]:
    """A bridge name and a /24 of this test's own; 10.231/16 is clear of podman's 10.88/16."""
    n = next(_counter)
    return f"zlo{os.getpid() % 100000}x{n}", IPv4Network(f"10.231.{(os.getpid() + n) % 256}.0/24")


@pytest.fixture(scope="module", autouse=True)
def _netns_dir() -> None:
    # The first namespace on a machine makes /run/netns a mount; make it
    # before the leak check's snapshot so it is not counted as a test's.
    if os.geteuid() == 0:
        plumbing.prepare_netns_dir()


class Overlayd:
    """One zlayer-overlayd with its own bridge and subnet, and ways to look at its work."""

    def __init__(
        self, paths: Paths, bus: PrivateBus, notify: NotifyListener, subnet: IPv4Network | None
    ) -> None:
        self.paths = paths
        self.bus = bus
        self.notify = notify
        self.bridge, default_subnet = _network_for_test()
        self.subnet = subnet or default_subnet
        self.table = "zlayer_" + self.bridge
        self.process: subprocess.Popen[str] | None = None
        paths.daemon_config("overlayd").write_text(
            f'metrics_port = 0\nbridge = "{self.bridge}"\nsubnet = "{self.subnet}"\n'
        )
        self.logs = ""

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, ZLAYER_BUS_ADDRESS=self.bus.address)

    wrapper: tuple[str, ...] = ()  # what runs overlayd (and execs it), e.g. ip netns exec

    def start(self) -> None:
        self.notify.messages.clear()
        self.process = start("overlayd", self.bus, self.notify, wrapper=self.wrapper)
        try:
            self.notify.wait_for("READY=1")
        except AssertionError:
            code, err = stop(self.process)
            self.process = None
            raise AssertionError(f"overlayd did not start (exit code {code}): {err}") from None

    def stop(self) -> None:
        if self.process is not None:
            code, err = stop(self.process)
            self.process = None
            self.logs += err
            assert code == 0, err
            assert "Traceback" not in err, err

    def remove_network(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [find_executable("zlayer-overlayd"), "--remove-network"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )

    def ask(self, call: Callable[[OverlayClient], Awaitable[T]]) -> T:
        """One call of overlayd's typed client, on a connection of its own."""

        async def run() -> T:
            bus = open_bus(self.bus.address)
            try:
                return await call(OverlayClient(bus))
            finally:
                bus.close()

        return asyncio.run(run())

    def call(self, method: str, *args: Any) -> Any:
        """A member of Overlay1 with any arguments, malformed ones too (the typed client
        sends only Structs)."""
        return self.ask(lambda client: getattr(client._proxy, method)(*args))

    def attach(self, container_id: str, hostname: str = "") -> Attachment:
        return self.ask(lambda client: client.attach(container_id, hostname))

    def reserve(self, container_id: str, hostname: str = "") -> Attachment:
        return self.ask(lambda client: client.reserve(container_id, hostname))

    def detach(self, container_id: str) -> None:
        self.ask(lambda client: client.detach(container_id))

    def attachments(self) -> list[Attachment]:
        return self.ask(lambda client: client.list_attachments())

    def network(self) -> NetworkInfo:
        return self.ask(lambda client: client.get_network())

    def metrics(self) -> str:
        status = self.ask(lambda client: client.status())
        with urllib.request.urlopen(status.metrics_url, timeout=5) as response:
            return str(response.read().decode())


def in_netns(attachment: Attachment | str, *argv: str) -> subprocess.CompletedProcess[str]:
    name = Path(attachment.netns if isinstance(attachment, Attachment) else attachment).name
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, timeout=30
    )


def ping(source: Attachment | str, address: str) -> bool:
    return in_netns(source, "busybox", "ping", "-c1", "-W2", address).returncode == 0


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def nft_table_exists(table: str) -> bool:
    out = subprocess.run(["nft", "list", "tables", "ip"], capture_output=True, text=True)
    return f"table ip {table}" in out.stdout.splitlines()


@pytest.fixture
def make_overlayd(zlayer_prefix: Paths, private_bus: PrivateBus) -> Iterator[Any]:
    listener = NotifyListener(zlayer_prefix.prefix / "notify.sock")
    made: list[Overlayd] = []

    def make(subnet: str | None = None) -> Overlayd:
        daemon = Overlayd(
            zlayer_prefix, private_bus, listener, IPv4Network(subnet) if subnet else None
        )
        made.append(daemon)
        return daemon

    try:
        yield make
    finally:
        for daemon in made:
            if daemon.process is not None:
                stop(daemon.process)
            result = daemon.remove_network()
            # Last resort, so one broken test cannot leave a bridge for the next.
            if link_exists(daemon.bridge):
                subprocess.run(["ip", "link", "del", daemon.bridge], check=False)
            if nft_table_exists(daemon.table):
                subprocess.run(["nft", "delete", "table", "ip", daemon.table], check=False)
            assert result.returncode == 0, result.stderr
            # Removed: without its state the prefix's own clean-up need not start
            # ``--remove-network`` a second time (a daemon's start-up per test).
            shutil.rmtree(zlayer_prefix.daemon_state("overlayd"), ignore_errors=True)
        listener.close()


@pytest.fixture
def overlayd(make_overlayd: Any) -> Overlayd:
    daemon: Overlayd = make_overlayd()
    daemon.start()
    return daemon


# ---------------------------------------------------------------- tests


def test_start_makes_bridge_table_and_forwarding(overlayd: Overlayd) -> None:
    assert link_exists(overlayd.bridge)
    shown = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", overlayd.bridge],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    gateway = overlayd.subnet.network_address + 1
    assert f"{gateway}/24" in shown
    rules = subprocess.run(
        ["nft", "list", "table", "ip", overlayd.table], capture_output=True, text=True, check=True
    ).stdout
    assert f"ip saddr {overlayd.subnet}" in rules and "masquerade" in rules
    assert "hook forward priority filter; policy drop;" in rules
    assert f'iifname "{overlayd.bridge}" ip daddr 127.0.0.0/8 drop' in rules
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    network = overlayd.network()
    assert network == NetworkInfo(
        bridge=overlayd.bridge, subnet=str(overlayd.subnet), gateway=str(gateway), allocations=0
    )

    # A second start finds everything in place and changes nothing.
    overlayd.stop()
    overlayd.start()
    assert overlayd.network() == network
    overlayd.stop()
    assert "created the bridge" not in overlayd.logs.split("ready on")[-1]


def test_two_namespaces_reach_each_other_and_the_gateway(overlayd: Overlayd) -> None:
    a = overlayd.attach("web-1", "web-1")
    b = overlayd.attach("web-2", "web-2")
    gateway = str(overlayd.subnet.network_address + 1)

    assert a.address != b.address
    for att in (a, b):
        assert Path(att.netns).exists() and att.netns.startswith("/run/netns/zl-")
        assert att.gateway == gateway and att.prefix_len == 24 and att.interface == "eth0"
        assert att.bridge == overlayd.bridge and len(att.host_veth) <= 15
        assert Path(f"/sys/class/net/{att.host_veth}/master").resolve().name == overlayd.bridge
        assert all(not ns.startswith("127.") for ns in att.dns)

    assert ping(a, b.address), "web-1 cannot reach web-2"
    assert ping(b, a.address), "web-2 cannot reach web-1"
    assert ping(a, gateway), "web-1 cannot reach the gateway"

    # A TCP connection too, not only ICMP: busybox nc listens in b, a connects.
    server = subprocess.Popen(
        ["ip", "netns", "exec", Path(b.netns).name, "busybox", "nc", "-l", "-p", "7070"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(50):
            sent = in_netns(a, "sh", "-c", f"echo hello | busybox nc -w 2 {b.address} 7070")
            if sent.returncode == 0:
                break
        out, _ = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert out.strip() == "hello"

    inside = in_netns(a, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert f"{a.address}/24" in inside
    assert f"default via {gateway}" in in_netns(a, "ip", "route").stdout
    assert "UP" in in_netns(a, "ip", "-o", "link", "show", "lo").stdout

    # Attach is idempotent per container id.
    assert overlayd.attach("web-1", "web-1") == a
    assert {x.container_id for x in overlayd.attachments()} == {"web-1", "web-2"}
    assert overlayd.network().allocations == 2

    metrics = overlayd.metrics()
    assert "zlayer_overlay_allocations 2.0" in metrics
    assert 'zlayer_overlay_attaches_total{result="ok"} 3.0' in metrics

    overlayd.detach("web-1")
    overlayd.detach("web-2")
    assert "zlayer_overlay_detaches_total 2.0" in overlayd.metrics()


def test_replicas_reach_outside_through_nat(overlayd: Overlayd) -> None:
    """An "upstream" namespace with no route back to the subnet answers only masqueraded pings."""
    a = overlayd.attach("nat-1")
    tag = overlayd.bridge[3:]
    upstream, host_end, far_end = f"zlup{tag}", f"zlu{tag}h", f"zlu{tag}p"
    third = (overlayd.subnet.network_address.packed[2] + 128) % 256
    host_ip, far_ip = f"10.232.{third}.1", f"10.232.{third}.2"
    try:
        for argv in (
            ["ip", "netns", "add", upstream],
            ["ip", "link", "add", host_end, "type", "veth", "peer", "name", far_end],
            ["ip", "link", "set", far_end, "netns", upstream],
            ["ip", "addr", "add", f"{host_ip}/30", "dev", host_end],
            ["ip", "link", "set", host_end, "up"],
            ["ip", "-n", upstream, "addr", "add", f"{far_ip}/30", "dev", far_end],
            ["ip", "-n", upstream, "link", "set", far_end, "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        # upstream has no route to the subnet: only masqueraded packets get an answer.
        assert ping(a, far_ip), "the replica cannot reach a host beyond the node"
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", upstream], capture_output=True)
    overlayd.detach("nat-1")


def test_allocations_survive_a_restart_and_are_repaired(overlayd: Overlayd) -> None:
    a = overlayd.attach("keep-1")
    b = overlayd.attach("keep-2")
    c = overlayd.attach("gone-3")

    # SIGTERM leaves the replicas' network in place.
    overlayd.stop()
    assert Path(a.netns).exists() and link_exists(a.host_veth)
    assert ping(a, b.address)

    # While overlayd is down: one veth vanishes, one namespace vanishes.
    subprocess.run(["ip", "link", "del", b.host_veth], check=True)
    subprocess.run(["ip", "netns", "del", Path(c.netns).name], check=True)

    overlayd.start()
    assert overlayd.attach("keep-1") == a
    assert {x.container_id: x.address for x in overlayd.attachments()} == {
        "keep-1": a.address,
        "keep-2": b.address,
    }
    assert link_exists(b.host_veth), "the missing veth was not put back"
    assert ping(a, b.address) and ping(b, a.address)
    assert not link_exists(c.host_veth)

    overlayd.stop()
    assert "repaired keep-2" in overlayd.logs
    assert f"released {c.address} of gone-3" in overlayd.logs

    # The same container id gets the same address after a restart.
    overlayd.start()
    assert overlayd.attach("keep-2") == b
    overlayd.detach("keep-1")
    overlayd.detach("keep-2")


def test_reserve_makes_an_empty_namespace_that_attach_fills(overlayd: Overlayd) -> None:
    """agentd creates a replica's container in the namespace Reserve made while Attach
    makes the rest, and starts it once Attach has answered."""
    reserved = overlayd.reserve("early-1", "early-1")
    assert Path(reserved.netns).exists() and not link_exists(reserved.host_veth)
    links = in_netns(reserved, "ip", "-o", "link").stdout
    assert "lo:" in links and "eth0" not in links, links
    assert overlayd.reserve("early-1", "early-1") == reserved  # asked again: the same

    attached = overlayd.attach("early-1", "early-1")
    assert attached == reserved
    gateway = str(overlayd.subnet.network_address + 1)
    assert f"{attached.address}/24" in in_netns(attached, "ip", "-o", "addr").stdout
    assert ping(attached, gateway), "the reserved namespace cannot reach the gateway"
    hairpin = Path(f"/sys/class/net/{attached.host_veth}/brport/hairpin_mode")
    assert hairpin.read_text().strip() == "1"

    # Reserved, then overlayd stops before Attach: its start makes the rest.
    second = overlayd.reserve("early-2", "early-2")
    overlayd.stop()
    overlayd.start()
    assert ping(second, attached.address), "a reserved namespace was not repaired at start"
    assert overlayd.attach("early-2", "early-2") == second

    # Reserved and never attached: Detach takes the namespace and the address back.
    third = overlayd.reserve("early-3", "early-3")
    overlayd.detach("early-3")
    assert not Path(third.netns).exists()
    assert {a.container_id for a in overlayd.attachments()} == {"early-1", "early-2"}
    overlayd.detach("early-1")
    overlayd.detach("early-2")


def test_detach_removes_veth_namespace_and_allocation(overlayd: Overlayd) -> None:
    a = overlayd.attach("short-1")
    assert Path(a.netns).exists() and link_exists(a.host_veth)
    overlayd.detach("short-1")
    assert not Path(a.netns).exists()
    assert not link_exists(a.host_veth)
    assert overlayd.attachments() == []
    assert overlayd.network().allocations == 0
    # Detaching again, or something never attached, is not an error.
    overlayd.detach("short-1")
    overlayd.detach("never-attached")


def test_full_subnet_is_one_clear_sentence(make_overlayd: Any) -> None:
    _, base = _network_for_test()
    tiny = f"10.233.{base.network_address.packed[2]}.0/30"
    overlayd: Overlayd = make_overlayd(tiny)
    overlayd.start()
    only = overlayd.attach("only-1")
    assert only.address == str(IPv4Network(tiny).network_address + 2)
    with pytest.raises(UnavailableError) as caught:
        overlayd.attach("one-too-many")
    message = str(caught.value)
    assert tiny in message and "no free address" in message
    assert message.count(". ") == 0 and "\n" not in message, message
    with pytest.raises(UnavailableError) as reserving:
        overlayd.reserve("one-too-many")
    assert str(reserving.value) == message
    # Nothing of the refused attach is left.
    names = plumbing.names_for(overlayd.bridge, "one-too-many")
    assert not names.netns_path.exists() and not link_exists(names.host_veth)
    overlayd.detach("only-1")
    assert overlayd.attach("one-too-many").address == only.address
    overlayd.detach("one-too-many")


def test_remove_network_takes_everything_away(overlayd: Overlayd) -> None:
    a = overlayd.attach("left-1")
    overlayd.stop()
    result = overlayd.remove_network()
    assert result.returncode == 0, result.stderr
    assert not link_exists(overlayd.bridge) and not link_exists(a.host_veth)
    assert not Path(a.netns).exists()
    assert not nft_table_exists(overlayd.table)
    assert "removed" in result.stderr
    # And again, with nothing there: still fine.
    assert overlayd.remove_network().returncode == 0


def test_overlapping_subnet_refuses_to_start(zlayer_prefix: Paths, private_bus: PrivateBus) -> None:
    bridge, _ = _network_for_test()
    zlayer_prefix.daemon_config("overlayd").write_text(
        f'metrics_port = 0\nbridge = "{bridge}"\nsubnet = "127.200.0.0/24"\n'
    )
    code, err = stop(start("overlayd", private_bus, None), signal_first=False)
    assert code == 78, err
    assert "127.200.0.0/24 overlaps" in err and "Traceback" not in err
    assert not link_exists(bridge)


@pytest.mark.parametrize(
    ("line", "key"),
    [('bridge = "much-too-long-name0"', "bridge"), ('subnet = "10.231.0.0/31"', "subnet")],
)
def test_bad_settings_exit_78(
    zlayer_prefix: Paths, private_bus: PrivateBus, line: str, key: str
) -> None:
    zlayer_prefix.daemon_config("overlayd").write_text(f"metrics_port = 0\n{line}\n")
    code, err = stop(start("overlayd", private_bus, None), signal_first=False)
    assert code == 78, err
    assert "overlayd.toml" in err and key in err and "Traceback" not in err


def test_concurrent_attaches_get_distinct_addresses_and_status_keeps_answering(
    overlayd: Overlayd,
) -> None:
    ids = [f"many-{i}" for i in range(12)]

    async def run() -> tuple[list[Attachment], list[DaemonStatus]]:
        bus = open_bus(overlayd.bus.address)
        try:
            daemon = OverlayClient(bus)
            attaches = asyncio.gather(*(daemon.attach(cid, cid) for cid in ids))
            # The bus is served while netlink work runs in a thread.
            statuses = asyncio.gather(*(daemon.status() for _ in range(5)))
            return await attaches, await statuses
        finally:
            bus.close()

    attached, statuses = asyncio.run(run())
    assert len({a.address for a in attached}) == len(ids)
    assert all(s.state == "running" for s in statuses)
    assert ping(attached[0], attached[-1].address)
    for cid in ids:
        overlayd.detach(cid)
    assert overlayd.network().allocations == 0
