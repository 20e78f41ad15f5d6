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


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


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


PROOFS = """
version: v1
deployment: proofs
services:
{services}
"""

PROOF_JOB = """
  {name}:
    rtype: job
    image: {image}
    command:
      entrypoint: ["cat"]
      args: ["/proof"]
"""


def build(node: Node, *args: str) -> None:
    result = node.ctl(*args, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.usefixtures("down_everything")
def test_every_kind_of_build_makes_an_image_up_runs(node: Node, tmp_path: Path) -> None:
    """A Dockerfile with a target and a build arg, a multi-stage ZImagefile and a
    pipeline with a dependency: each image runs as a job whose output proves it."""
    archive = write_oci_archive(busybox_image(), tmp_path / "busybox.tar")
    base = f"oci-archive:{archive}"

    dockerfile = tmp_path / "docker"
    dockerfile.mkdir()
    (dockerfile / "Dockerfile").write_text(
        f"FROM {base} AS common\n"
        "ARG FLAVOUR=plain\n"
        'RUN echo "flavour=$FLAVOUR" > /proof\n'
        "FROM common AS extra\n"
        "RUN echo extra >> /proof\n"
        "FROM common AS final\n"
        "RUN echo final >> /proof\n"
    )
    build(
        node, "build", str(dockerfile), "-t", "zlayer/proof-docker:1",
        "--target", "extra", "--build-arg", "FLAVOUR=spicy",
    )  # fmt: skip

    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "ZImagefile").write_text(
        textwrap.dedent(
            f"""
            stages:
              maker:
                base: "{base}"
                steps:
                  - run: "echo made-in-a-stage > /made"
              runtime:
                base: "{base}"
                steps:
                  - copy: /made
                    from: maker
                    to: /proof
                    chmod: "600"
            """
        )
    )
    build(node, "build", str(stages), "-t", "zlayer/proof-stages:1")

    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "Dockerfile.base").write_text(f"FROM {base}\nRUN echo from-base > /proof\n")
    (pipe / "Dockerfile.app").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo and-app >> /proof\n"
    )
    (pipe / "ZPipeline.yaml").write_text(
        textwrap.dedent(
            """
            version: "1"
            vars: {TAG: "1"}
            images:
              app:
                file: Dockerfile.app
                depends_on: [base]
                tags: ["zlayer/proof-app:${TAG}"]
                build_args: {BASE_IMAGE: "zlayer/proof-base:${TAG}"}
              base:
                file: Dockerfile.base
                tags: ["zlayer/proof-base:${TAG}"]
            """
        )
    )
    build(node, "pipeline", "-f", str(pipe / "ZPipeline.yaml"))

    images = {
        "docker": "zlayer/proof-docker:1",
        "stages": "zlayer/proof-stages:1",
        "app": "zlayer/proof-app:1",
    }
    services = "".join(PROOF_JOB.format(name=n, image=i) for n, i in images.items())
    node.ctl("up", "-b", str(node.spec("proofs", PROOFS.format(services=services))), check=True)
    expected = {
        "docker": "flavour=spicy\nextra\n",
        "stages": "made-in-a-stage\n",
        "app": "from-base\nand-app\n",
    }
    for name, output in expected.items():
        run = node.ctl("job", "trigger", name, "-d", "proofs", "--wait", timeout=120)
        assert run.returncode == 0, f"{name}: {run.stderr}"
        logs = node.ctl("logs", name, "-d", "proofs", "-n", "5", check=True)
        assert output in logs.stdout, f"{name}: {logs.stdout!r}"
    node.ctl("down", "proofs", check=True)
