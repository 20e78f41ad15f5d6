"""An image from a registry runs: EnsureImage pulls it for ``zlayerctl up``, and
``zlayerctl system prune`` keeps it while a replica uses it, removes it after."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.bus import open_bus, resolve_bus_address
from shared.busybox_image import busybox_image, write_oci_layout
from shared.clients import RegistryClient
from shared.wire.jobs import JobInfo
from tests.e2e.node import Node, wait_until
from tests.registry_fixture import (
    Registry,
    fault_proxy,
    need_tools,
    skopeo_copy,
    start_registry,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.usefixtures("down_everything"),
]

SPEC = """
version: v1
deployment: pulled
services:
  web:
    image: {{name: "{image}", pull_policy: if_not_present}}
    command:
      entrypoint: ["sh", "-c"]
      args: ["mkdir -p /www && echo pulled > /www/index.html && exec httpd -f -p 8080 -h /www"]
    endpoints: [{{name: http, protocol: http, port: 8080}}]
    scale: {{mode: fixed, replicas: 1}}
    health: {{interval: 1s, timeout: 1s, retries: 1, check: {{type: http, url: /index.html}}}}
"""


@pytest.fixture
def registry() -> Iterator[Registry]:
    need_tools("skopeo")
    server = start_registry()
    try:
        yield server
    finally:
        server.stop()


def image_names(node: Node) -> dict[str, str]:
    """Every image name on the node -> its id."""
    listed = json.loads(node.ctl("image", "ls", "--format", "json", check=True).stdout)
    return {name: image["id"] for image in listed for name in image["names"]}


def registry_jobs(node: Node) -> list[JobInfo]:
    async def listed() -> list[JobInfo]:
        bus = open_bus(resolve_bus_address(node.paths))
        try:
            return await RegistryClient(bus).list_jobs()
        finally:
            bus.close()

    return asyncio.run(listed())


def prune(node: Node) -> list[str]:
    out = node.ctl("system", "prune", "--force", "--format", "json", check=True)
    removed: list[str] = json.loads(out.stdout)["images"]
    return removed


def test_a_pulled_image_runs_and_prune_keeps_it_only_while_used(
    node: Node, registry: Registry, tmp_path: Path
) -> None:
    # The busybox test image, made distinct from the imported one (its own
    # config and zstd layer), so the pull has to fetch every blob.
    image = busybox_image()
    image.config["config"]["Labels"]["pulled.from"] = "a registry"
    layout = write_oci_layout(image, tmp_path / "oci", compression="zstd")
    reference = f"{registry.host}/e2e/busybox:1"
    skopeo_copy(f"oci:{layout}", f"docker://{reference}")
    assert reference not in image_names(node)

    node.ctl("up", "-d", str(node.spec("pulled", SPEC.format(image=reference))), check=True)
    (replica,) = node.replicas("pulled")
    assert replica["state"] == "running"
    with urllib.request.urlopen(f"http://{replica['address']}:8080/index.html", timeout=5) as page:
        assert page.read().decode() == "pulled\n"
    # The pull a replica's start needed was a registryd job, ended with the image.
    pulls = [job for job in registry_jobs(node) if job.kind == "ensure-image"]
    assert [(job.target, job.state) for job in pulls] == [(reference, "done")]
    names = image_names(node)
    assert reference in names
    assert names[reference] != names.get("docker.io/zlayer/busybox:latest")
    table = node.ctl("image", "ls", check=True).stdout
    assert reference in table
    inspect = node.ctl("image", "inspect", reference, check=True).stdout
    assert ["Runtime:", "oci"] in [line.split() for line in inspect.splitlines()]

    # In use: prune leaves it (and may take the imported image nobody runs).
    assert reference not in prune(node)
    assert reference in image_names(node)
    assert node.replicas("pulled")[0]["state"] == "running"

    node.ctl("down", "pulled", check=True)
    assert prune(node) == [reference]
    assert reference not in image_names(node)
    gone = node.ctl("image", "inspect", reference)
    assert gone.returncode != 0
    assert f"image {reference} is not on this node" in gone.stderr


def test_a_replica_agentd_was_killed_while_its_image_pulled_starts_when_it_is_back(
    node: Node, registry: Registry, tmp_path: Path
) -> None:
    # The replica's record says "creating" and no container was made yet: the restarted
    # agentd has nothing to adopt and starts it again (it used to wait on a container
    # that would never exist, and the replica stayed "creating").
    image = busybox_image()
    image.config["config"]["Labels"]["pulled.from"] = "a slow registry"
    layout = write_oci_layout(image, tmp_path / "oci")
    skopeo_copy(f"oci:{layout}", f"docker://{registry.host}/e2e/slow:1")
    with fault_proxy(registry.url) as proxy:
        proxy.slow = True  # the pull takes seconds: time to kill agentd in it
        reference = f"{proxy.host}/e2e/slow:1"
        node.ctl("up", "-b", str(node.spec("pulled", SPEC.format(image=reference))), check=True)
        record = node.paths.daemon_state("agentd") / "replicas" / "pulled-web-1-r1.json"
        wait_until(
            lambda: record.is_file() and json.loads(record.read_text())["state"] == "creating",
            20,
            "the replica's record saying creating while its image pulls",
        )
        killed = node.daemon_pid("agentd")
        os.kill(killed, signal.SIGKILL)
        wait_until(
            lambda: node.daemon_pid("agentd") not in (0, killed),
            30,
            "zlayer-agentd restarted by its supervisor",
        )
        # healthy, not only running: its httpd listens a moment after the process starts
        (replica,) = wait_until(
            lambda: [r for r in node.replicas("pulled") if r["health"] == "healthy"],
            60,
            "the replica healthy after agentd came back",
        )
    with urllib.request.urlopen(f"http://{replica['address']}:8080/index.html", timeout=5) as page:
        assert page.read().decode() == "pulled\n"
    node.ctl("down", "pulled", check=True)
