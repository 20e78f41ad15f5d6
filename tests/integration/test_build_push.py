"""``zlayerctl build --push``: a real buildah build in registryd, pushed to a real
docker-registry, read back by skopeo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_registryd import Registryd
from tests.integration.test_registryd import registryd as registryd
from tests.registry_fixture import Registry, need_tools, start_registry

pytestmark = [
    pytest.mark.skipif(shutil.which("buildah") is None, reason="apt-get install buildah"),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah builds here need root"),
]


@pytest.fixture
def registry() -> Iterator[Registry]:
    server = start_registry()
    try:
        yield server
    finally:
        server.stop()


def skopeo_inspect(reference: str) -> subprocess.CompletedProcess[str]:
    need_tools("skopeo")
    return subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{reference}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_build_push_puts_the_built_image_in_the_registry(
    registryd: Registryd, registry: Registry, busybox_image: dict[str, Path], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "Dockerfile").write_text(
        f"FROM oci-archive:{busybox_image['oci-archive']}\n"
        'RUN echo pushed > /marker\nLABEL built.by="zlayer test"\nCMD ["cat", "/marker"]\n'
    )
    target = f"{registry.host}/team/built:1"
    assert skopeo_inspect(target).returncode != 0  # not there before

    result = registryd.ctl("build", str(project), "-t", target, "--push")
    assert result.returncode == 0, result.stderr
    assert f"pushing {target}" in result.stdout

    found = skopeo_inspect(target)
    assert found.returncode == 0, found.stderr
    remote = json.loads(found.stdout)
    assert remote["Labels"]["built.by"] == "zlayer test"
    local = json.loads(registryd.ok("image", "inspect", target, "--format", "json"))
    assert remote["Digest"] == local["image"]["manifest_digest"]
    assert len(remote["Layers"]) == len(local["image"]["layers"]) == 2
