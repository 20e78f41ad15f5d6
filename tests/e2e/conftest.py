"""Fixtures of the end-to-end tests: the leak check around each, one node per module, and
one node the modules that leave it as they found it share."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from shared.busybox_image import busybox_image, write_oci_layout
from shared.paths import Paths
from tests.conftest import (
    kill_prefix_processes,
    prefix_processes,
    remove_test_network,
    shared_node_of,
    write_test_config,
)
from tests.e2e.node import IMAGE, Node, free_port, wait_until
from tests.wasm_components import Component, WasmComponents, wasm_components

__all__ = ["wasm_components"]  # the session's componentize-py builds, for the wasm tests


@pytest.fixture(scope="session", autouse=True)
def _wasm_components_ahead(request: pytest.FixtureRequest) -> None:
    """With the first end-to-end test, the components this run's WebAssembly modules (the
    last ones) will ask for start building and packing in a thread: a minute of a core
    each, done while the earlier modules mostly wait on their daemons. A module names
    what it will ask for in ``WASM_COMPONENTS``: (component, image name) pairs."""
    wanted: list[tuple[Component, str]] = []
    for item in request.session.items:
        if "wasm_components" in item.fixturenames:
            for pair in getattr(item.module, "WASM_COMPONENTS", ()):
                if pair not in wanted:
                    wanted.append(pair)
    if wanted:
        components: WasmComponents = request.getfixturevalue("wasm_components")
        components.prepare(wanted)


@pytest.fixture(autouse=True)
def _integration_leak_check(leak_check: None) -> None:
    """Every end-to-end test runs under the leak check."""


@contextlib.contextmanager
def running_node(
    prefix: Path, tmp_path_factory: pytest.TempPathFactory, network_tag: str = "zle"
) -> Iterator[Node]:
    """Six daemons under ``zlayerctl daemon run`` in ``prefix``, the busybox image imported.

    On the way out the daemons stop, and whatever a failed test left on the
    node (containers under agentd's runtime root, their mounts and network
    namespaces) goes with the node network.
    """
    prefix.mkdir()
    paths = Paths(prefix)
    write_test_config(paths, network_tag=network_tag)
    paths.daemon_config("proxyd").write_text("metrics_port = 0\naccess_log = false\n")
    # proxyd listens on each endpoint's port: the tests' public http endpoints use this one.
    node = Node(paths, tmp_path_factory.mktemp("work"), free_port())
    image_dir = write_oci_layout(busybox_image(), tmp_path_factory.mktemp("image") / "oci")
    try:
        node.ctl("daemon", "run", "--detach", check=True)
        node.ctl("image", "import", str(image_dir), "--name", IMAGE, check=True)
        yield node
    finally:
        node.ctl("daemon", "stop")
        remove_leftover_containers(paths)
        remove_test_network(paths)
        left = prefix_processes(prefix)
        kill_prefix_processes(prefix)
        subprocess.run(["rm", "-rf", str(prefix)], check=False)
        assert not left, f"processes left running: {left}"


def remove_leftover_containers(paths: Paths) -> list[str]:
    """With the daemons stopped: remove the containers agentd's runtime root still
    holds, unmount what is mounted under the prefix, and take down the network
    namespaces and veths of every container id the node's state names (those the
    node network's own clean-up no longer knows). What was removed, for the log."""
    from daemons.overlayd import plumbing
    from daemons.overlayd.settings import OverlaySettings

    removed: list[str] = []
    ids: set[str] = set()
    for runtime in ("crun", "runc"):
        root = paths.run_dir / "agentd" / runtime
        if not root.is_dir() or shutil.which(runtime) is None:
            continue
        listed = subprocess.run(
            [runtime, f"--root={root}", "list", "-q"], capture_output=True, text=True, check=False
        )
        for cid in listed.stdout.split():
            ids.add(cid)
            subprocess.run(
                [runtime, f"--root={root}", "delete", "-f", cid], capture_output=True, check=False
            )
            removed.append(f"container {cid}")
    bundles = paths.daemon_state("agentd") / "bundles"
    if bundles.is_dir():
        ids.update(p.name for p in bundles.iterdir())
    with contextlib.suppress(OSError, ValueError):
        held = json.loads((paths.daemon_state("overlayd") / "allocations.json").read_text())
        ids.update(held.get("allocations", {}))
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4] for line in handle]
    for point in sorted(points, key=len, reverse=True):
        if point.startswith(f"{paths.prefix}/"):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            removed.append(f"mount {point}")
    try:
        bridge = OverlaySettings.load("overlayd", paths).bridge
    except Exception:  # no readable settings: nothing of ours to name
        return removed
    for cid in sorted(ids):
        removed += plumbing.unplumb(plumbing.names_for(bridge, cid))
    return removed


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(Path(f"/tmp/zle-{os.getpid()}"), tmp_path_factory) as started:
        yield started


@pytest.fixture(scope="module")
def shared_node(
    request: pytest.FixtureRequest,
    _shared_nodes: dict[str, tuple[ExitStack, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Node]:
    """One node for the modules that leave it as they found it: their daemons running
    and their settings untouched, nothing of theirs deployed, no secret, image or token
    of theirs that another module's listing would show. Such a module names it its
    ``node``; its first user starts it and its last stops it."""
    prefix = Path(f"/tmp/zlh-{os.getpid()}")
    yield from shared_node_of(
        request,
        _shared_nodes,
        "e2e",
        lambda stack: stack.enter_context(
            running_node(prefix, tmp_path_factory, network_tag="zlh")
        ),
    )


@pytest.fixture
def own_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node of the test's own, for tests that stop, restart or break the daemons."""
    prefix = Path(f"/tmp/zle-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    with running_node(prefix, tmp_path_factory, network_tag="zln") as started:
        yield started
        for deployment in json.loads(started.ctl("ps", "--format", "json").stdout or "[]"):
            started.ctl("down", deployment["name"])


@pytest.fixture
def restarted_node(node: Node) -> Iterator[Node]:
    """The module's node, for a test that stops and starts its daemons or kills one.

    A node of the test's own would cost six daemons' start and stop; instead, after
    the test the daemons run again (started anew if the test left them stopped or
    failing) and nothing stays deployed, so the module's next test finds the node
    as its other tests leave it."""
    yield node
    if node.ctl("status").returncode != 0:
        node.ctl("daemon", "stop")
        node.ctl("daemon", "run", "--detach")
    wait_until(lambda: node.ctl("status").returncode == 0, 60, "all six daemons to run")
    for deployment in json.loads(node.ctl("ps", "--format", "json").stdout or "[]"):
        node.ctl("down", deployment["name"])


@pytest.fixture
def down_everything(node: Node) -> Iterator[None]:
    """Whatever a test leaves deployed (a failed assertion, say) goes before the leak check."""
    yield
    listed = node.ctl("ps", "--format", "json")
    if listed.returncode == 0:
        for deployment in json.loads(listed.stdout):
            node.ctl("down", deployment["name"])
