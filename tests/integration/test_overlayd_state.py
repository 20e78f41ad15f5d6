"""zlayer-overlayd's state after a crash and after removal, with real namespaces and nftables.

- An allocations file that cannot be read (truncated by a crash, garbage) is
  moved aside and the allocations are taken back from the attachments that
  exist on the node, so replicas keep their addresses; a saved traffic file
  that cannot be read is moved aside and waits for the next push.
- ``--remove-network`` leaves the host as it was: no nft table, no bridge,
  and the sysctls overlayd changed back at the values it found. These tests
  run overlayd in a network namespace of their own (``ip netns exec``):
  ``net.ipv4.ip_forward`` is per namespace, and setting the machine's own
  would disturb whatever else runs on it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.supervisor import find_executable
from shared.busdaemon import PrivateBus
from shared.paths import Paths
from tests.integration.test_daemon import NotifyListener, stop
from tests.integration.test_overlayd import (  # noqa: F401 (fixtures)
    Overlayd,
    _netns_dir,
    make_overlayd,
    ping,
    pytestmark,
)


def corrupt(path: Path, how: str) -> None:
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2] if how == "truncated" else b"\x00\xffgarbage\n")


def aside(path: Path) -> list[Path]:
    return list(path.parent.glob(f"{path.name}.corrupt-*"))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_an_unreadable_allocations_file_is_moved_aside_and_replicas_keep_their_addresses(
    make_overlayd: Any,  # noqa: F811
    zlayer_prefix: Paths,
    how: str,
) -> None:
    overlayd: Overlayd = make_overlayd()
    overlayd.start()
    a = overlayd.attach("web-1", "web-1")
    b = overlayd.attach("web-2", "web-2")
    c = overlayd.attach("web-3", "web-3")
    overlayd.stop()

    state = zlayer_prefix.daemon_state("overlayd")
    allocations = state / "allocations.json"
    corrupt(allocations, how)
    traffic = state / "traffic" / "demo.json"
    traffic.parent.mkdir(exist_ok=True)
    traffic.write_bytes(b'{"deployment": "demo", "services": [{"serv')
    # web-3's network was made by an overlayd that did not label its veth:
    # nothing names its owner until its replica attaches again.
    subprocess.run(["ip", "link", "set", "dev", c.host_veth, "alias", ""], check=True)

    overlayd.start()  # no crash loop: it starts
    held = {x.container_id: x.address for x in overlayd.attachments()}
    assert held == {"web-1": a.address, "web-2": b.address}
    assert ping(a, b.address) and ping(b, a.address)
    # An Attach again (agentd adopting web-3) finds its network and keeps its address.
    assert overlayd.attach("web-3", "web-3").address == c.address
    fresh = overlayd.attach("web-4", "web-4")
    assert fresh.address not in {a.address, b.address, c.address}
    overlayd.stop()

    (moved,) = aside(allocations)
    assert f"{allocations} cannot be used" in overlayd.logs
    assert f"moved it to {moved}" in overlayd.logs
    assert len(aside(traffic)) == 1 and not traffic.exists()
    # The file written since is whole: the next start reads every allocation from it.
    seen = len(overlayd.logs)
    overlayd.start()
    held = {x.container_id: x.address for x in overlayd.attachments()}
    assert held == {
        "web-1": a.address,
        "web-2": b.address,
        "web-3": c.address,
        "web-4": fresh.address,
    }
    overlayd.stop()
    assert "cannot be used" not in overlayd.logs[seen:]

    # Removal with the allocations lost still finds every attachment on the bridge.
    allocations.unlink()
    removed = overlayd.remove_network()
    assert removed.returncode == 0, removed.stderr
    for attachment in (a, b, c, fresh):
        assert not Path("/sys/class/net", attachment.host_veth).exists()
        assert not Path(attachment.netns).exists()


# ---------------------------------------------------------------- removal


class NamespacedOverlayd(Overlayd):
    """overlayd run with ``ip netns exec NETNS``: the namespace is its host."""

    netns = ""

    def remove_network(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, find_executable("zlayer-overlayd"),
             "--remove-network"],
            capture_output=True, text=True, timeout=60, env=self.env,
        )  # fmt: skip

    def sh(self, script: str) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, "sh", "-c", script],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    def sysctl(self, key: str) -> str:
        return self.sh(f"cat /proc/sys/{key}")


@pytest.fixture
def namespaced_overlayd(zlayer_prefix: Paths, private_bus: PrivateBus) -> Iterator[Any]:
    netns = f"zlh{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    listener = NotifyListener(zlayer_prefix.prefix / "notify.sock")
    daemon = NamespacedOverlayd(zlayer_prefix, private_bus, listener, None)
    daemon.netns = netns
    daemon.wrapper = ("ip", "netns", "exec", netns)
    try:
        daemon.sh("ip link set lo up")
        yield daemon
    finally:
        if daemon.process is not None:
            stop(daemon.process)
        daemon.remove_network()
        # Never let a record of this namespace's settings reach a removal run
        # in the machine's own namespace (the prefix's clean-up).
        (zlayer_prefix.daemon_state("overlayd") / "sysctls.json").unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", netns], check=False)
        listener.close()


FORWARD = "net/ipv4/ip_forward"


@pytest.mark.parametrize("forwarding_before", ["0", "1"])
def test_remove_network_leaves_the_host_as_it_was(
    namespaced_overlayd: NamespacedOverlayd, zlayer_prefix: Paths, forwarding_before: str
) -> None:
    overlayd = namespaced_overlayd
    bridge, table = overlayd.bridge, overlayd.table
    overlayd.sh(f"echo {forwarding_before} > /proc/sys/{FORWARD}")
    localnet_all = overlayd.sysctl("net/ipv4/conf/all/route_localnet")
    tables_before = overlayd.sh("nft list tables")
    links_before = overlayd.sh("ls /sys/class/net")

    overlayd.start()
    assert overlayd.sysctl(FORWARD) == "1"
    assert overlayd.sysctl(f"net/ipv4/conf/{bridge}/route_localnet") == "1"
    assert f"table ip {table}" in overlayd.sh("nft list tables")
    overlayd.stop()
    # A restart finds forwarding on (its own doing) and must not take that for
    # the value before: removal still puts back what was there first.
    overlayd.start()
    overlayd.stop()

    removed = overlayd.remove_network()
    assert removed.returncode == 0, removed.stderr
    assert "Traceback" not in removed.stderr
    assert overlayd.sysctl(FORWARD) == forwarding_before
    if forwarding_before == "0":
        assert "net.ipv4.ip_forward (set back to 0)" in removed.stderr
    assert overlayd.sysctl("net/ipv4/conf/all/route_localnet") == localnet_all
    assert overlayd.sh("nft list tables") == tables_before
    assert overlayd.sh("ls /sys/class/net") == links_before
    assert not (zlayer_prefix.daemon_state("overlayd") / "sysctls.json").exists()
    # Removing again finds nothing to do and changes nothing.
    again = overlayd.remove_network()
    assert again.returncode == 0 and overlayd.sysctl(FORWARD) == forwarding_before
