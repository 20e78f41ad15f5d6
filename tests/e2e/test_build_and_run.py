"""A built image runs: ``zlayerctl build`` then ``zlayerctl up`` of a spec that uses it."""

from __future__ import annotations

import os
import shutil
import textwrap
import urllib.request
from pathlib import Path

import pytest

from shared.busybox_image import busybox_image, write_oci_archive
from tests.e2e.node import Node

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.skipif(shutil.which("buildah") is None, reason="apt-get install buildah"),
]

SPEC = """
version: v1
deployment: built
services:
  web:
    image: zlayer/built-web:1
    endpoints: [{name: http, protocol: http, port: 8080}]
    scale: {mode: fixed, replicas: 1}
    health: {interval: 1s, timeout: 1s, retries: 1, check: {type: http, url: /index.html}}
"""


@pytest.mark.usefixtures("down_everything")
def test_a_built_image_serves_once_deployed(node: Node, tmp_path: Path) -> None:
    archive = write_oci_archive(busybox_image(), tmp_path / "busybox.tar")
    context = tmp_path / "site"
    context.mkdir()
    (context / "index.html").write_text("built by zlayer\n")
    (context / "ZImagefile").write_text(
        textwrap.dedent(
            f"""
            base: "oci-archive:{archive}"
            args: {{RELEASE: dev}}
            steps:
              - copy: index.html
                to: /www/index.html
                owner: "65534:65534"
              - run: "echo release=$RELEASE >> /www/index.html"
            expose: 8080
            cmd: ["httpd", "-f", "-p", "8080", "-h", "/www"]
            """
        )
    )
    built = node.ctl(
        "build", str(context), "-t", "zlayer/built-web:1", "--build-arg", "RELEASE=42",
        timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "built docker.io/zlayer/built-web:1: " in built.stdout

    node.ctl("up", "-d", str(node.spec("built", SPEC)), "--timeout", "90", check=True)
    (replica,) = node.replicas("built")
    with urllib.request.urlopen(f"http://{replica['address']}:8080/index.html", timeout=5) as page:
        assert page.read().decode() == "built by zlayer\nrelease=42\n"
    node.ctl("down", "built", check=True)
