"""Fixtures of the end-to-end tests: the leak check around each, and one node per module."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.busybox_image import busybox_image, write_oci_layout
from shared.paths import Paths
from tests.conftest import (
    kill_prefix_processes,
    prefix_processes,
    remove_test_network,
    write_test_config,
)
from tests.e2e.node import IMAGE, Node, free_port


@pytest.fixture(autouse=True)
def _integration_leak_check(leak_check: None) -> None:
    """Every end-to-end test runs under the leak check."""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    prefix = Path(f"/tmp/zle-{os.getpid()}")
    prefix.mkdir()
    paths = Paths(prefix)
    write_test_config(paths, network_tag="zle")
    http_port = free_port()
    paths.daemon_config("proxyd").write_text(
        f"metrics_port = 0\nhttp_port = {http_port}\nhttps_port = {free_port()}\n"
        "access_log = false\n"
    )
    node = Node(paths, tmp_path_factory.mktemp("work"), http_port)
    image_dir = write_oci_layout(busybox_image(), tmp_path_factory.mktemp("image") / "oci")
    try:
        node.ctl("daemon", "run", "--detach", check=True)
        node.ctl("image", "import", str(image_dir), "--name", IMAGE, check=True)
        yield node
    finally:
        node.ctl("daemon", "stop")
        remove_test_network(paths)
        left = prefix_processes(prefix)
        kill_prefix_processes(prefix)
        subprocess.run(["rm", "-rf", str(prefix)], check=False)
        assert not left, f"processes left running: {left}"


@pytest.fixture
def down_everything(node: Node) -> Iterator[None]:
    """Whatever a test leaves deployed (a failed assertion, say) goes before the leak check."""
    yield
    listed = node.ctl("ps", "--format", "json")
    if listed.returncode == 0:
        for deployment in json.loads(listed.stdout):
            node.ctl("down", deployment["name"])
