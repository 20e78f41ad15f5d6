"""``node init``/``join`` without ``--advertise``: the node's address on its default
route, found without netlink (schedd's unit allows no AF_NETLINK)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from daemons.schedd.cluster import default_address

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def route_source() -> str:
    out = subprocess.run(
        ["ip", "-4", "route", "get", "192.0.2.1"], capture_output=True, text=True, check=False
    ).stdout.split()
    return out[out.index("src") + 1] if "src" in out else ""


def test_the_address_is_the_default_routes_source() -> None:
    expected = route_source()
    if not expected:
        pytest.skip("this machine has no default route")
    assert default_address() == expected


def test_no_default_route_is_one_sentence(leak_check: None) -> None:
    name = f"zlt-noroute-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        code = (
            "from daemons.schedd.cluster import default_address\n"
            "from shared.bus import InvalidArgumentError\n"
            "try:\n    default_address()\nexcept InvalidArgumentError as exc:\n    print(exc)\n"
        )
        result = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", code],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.stdout.strip() == (
            "this node has no IPv4 address on a default route other nodes could reach; "
            "give one with --advertise"
        ), result.stderr
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
