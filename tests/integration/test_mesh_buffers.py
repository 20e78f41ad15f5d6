"""wireguard-go's UDP sockets get wide buffers: at the kernel's default a burst of
tunnel packets overflows them and each drop is a TCP retransmit inside the mesh.
Real wireguard-go, its real socket, read back with ss."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from shared.mesh import keys
from shared.mesh.device import Changes
from shared.mesh.userspace import SOCKET_BUFFER, UserspaceDevice

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a tun interface needs root"),
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go"),
]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


def receive_buffers(port: int) -> list[int]:
    """The receive buffer (bytes) of each UDP socket on ``port``, as ss shows them."""
    shown = subprocess.run(
        ["ss", "-uanm", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return [int(found) for found in re.findall(r"\brb(\d+)", shown)]


def test_wireguard_gos_udp_sockets_get_wide_buffers(tmp_path: Path) -> None:
    device = UserspaceDevice(f"zlwb{os.getpid() % 100000}", tmp_path / "pid", tmp_path / "log")
    port = free_udp_port()
    try:
        device.start()
        device.apply(Changes(private_key=keys.generate_private(), listen_port=port))
        with IPRoute() as ip:  # up: wireguard-go opens its sockets (anew)
            ip.link("set", index=ip.link_lookup(ifname=device.name)[0], state="up")
        before = receive_buffers(port)
        assert before and all(size < 2 * SOCKET_BUFFER for size in before), before
        assert "MiB UDP buffers" in device.widen_buffers()
        assert receive_buffers(port) == [2 * SOCKET_BUFFER] * len(before)
        assert device.widen_buffers() == ""  # already wide: nothing done
    finally:
        device.stop()
    assert device.pid() is None
