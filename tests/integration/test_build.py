"""Image builds by zlayer-registryd with real buildah, driven through ``zlayerctl``.

Base images come from the busybox test image (``FROM oci-archive:PATH``), so
nothing is pulled. buildah's storage lives under the test's own prefix (in
registryd's state directory) and goes with it; the leak check proves no
mount is left, and each test checks that no buildah container is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from ctl.supervisor import find_executable
from shared.paths import Paths
from shared.wire.registry import ImageRootfs
from tests.integration.test_registryd import Registryd, registryd  # noqa: F401

pytestmark = [
    pytest.mark.skipif(shutil.which("buildah") is None, reason="apt-get install buildah"),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah builds here need root"),
]


@pytest.fixture
def base(busybox_image: dict[str, Path]) -> str:
    """The FROM of every test build: the busybox test image as an oci-archive."""
    return f"oci-archive:{busybox_image['oci-archive']}"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "hello.txt").write_text("hello from the context\n")
    (root / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def buildah_containers(paths: Paths) -> list[str]:
    """Working containers left in registryd's buildah storage."""
    root = paths.daemon_state("registryd") / "build"
    out = subprocess.run(
        ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"),
         "--storage-driver", "overlay", "containers", "--quiet"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.split()


def rootfs(daemon: Registryd, reference: str) -> ImageRootfs:
    return daemon.ensure(reference)


def find(image: ImageRootfs, path: str) -> Path:
    """A file as the image shows it: from the topmost layer that has it."""
    for layer in image.lower_dirs:
        candidate = Path(layer) / path.lstrip("/")
        if os.path.lexists(candidate):
            return candidate
    raise AssertionError(f"{path} is not in the image")


def env_of(image: ImageRootfs) -> dict[str, str]:
    return dict(item.split("=", 1) for item in image.config.env)


def build(daemon: Registryd, *args: str) -> subprocess.CompletedProcess[str]:
    return daemon.ctl("build", *args)


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_multi_stage_target_and_build_arg(
    registryd: Registryd,  # noqa: F811
    zlayer_prefix: Paths,
    project: Path,
    base: str,
) -> None:
    write(
        project / "Dockerfile",
        f"""
        FROM {base} AS base
        ARG GREETING=hi
        ENV GREETING=$GREETING
        RUN echo "$GREETING" > /greeting

        FROM base AS release
        COPY hello.txt /app/hello.txt
        CMD ["cat", "/greeting"]

        FROM release AS debug
        RUN echo debug > /debug
        """,
    )
    result = build(
        registryd, str(project), "-t", "app:1", "--build-arg", "GREETING=bonjour",
        "--target", "release",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The log was streamed as buildah wrote it, then the result.
    assert 'RUN echo "$GREETING" > /greeting' in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("built docker.io/library/app:1: ")

    image = rootfs(registryd, "app:1")
    assert find(image, "/greeting").read_text() == "bonjour\n"
    assert env_of(image)["GREETING"] == "bonjour"
    assert find(image, "/app/hello.txt").read_text() == "hello from the context\n"
    assert image.config.cmd == ["cat", "/greeting"]
    with pytest.raises(AssertionError):
        find(image, "/debug")  # --target stopped before the debug stage

    # JSON for scripts: the id is the stored image's; the log goes to stderr.
    again = build(registryd, str(project), "-t", "app:debug", "--format", "json")
    assert again.returncode == 0, again.stderr
    stored = json.loads(again.stdout)
    assert stored["names"] == ["docker.io/library/app:debug"]
    assert stored["source"] == "Dockerfile"
    assert "STEP" in again.stderr
    debug = rootfs(registryd, "app:debug")
    assert debug.image.id == stored["id"]
    assert find(debug, "/debug").read_text() == "debug\n"
    assert find(debug, "/greeting").read_text() == "hi\n"  # the ARG's default
    assert buildah_containers(zlayer_prefix) == []


# ---------------------------------------------------------------- ZImagefile


def test_zimagefile_single_and_multi_stage(
    registryd: Registryd,  # noqa: F811
    project: Path,
    base: str,
) -> None:
    write(
        project / "ZImagefile",
        f"""
        version: "1"
        base: "{base}"
        workdir: /srv
        env: {{MODE: single}}
        steps:
          - copy: hello.txt
            to: /srv/hello.txt
            owner: "65534:65534"
            chmod: "640"
          - run: |
              echo "mode=$MODE" > /srv/mode
              pwd >> /srv/mode
        expose: [8080, "9090/udp"]
        user: nobody
        cmd: ["cat", "/srv/hello.txt"]
        """,
    )
    single = build(registryd, str(project), "-t", "single:1")  # found in the context
    assert single.returncode == 0, single.stderr
    image = rootfs(registryd, "single:1")
    hello = find(image, "/srv/hello.txt")
    assert (hello.stat().st_uid, hello.stat().st_gid) == (65534, 65534)
    assert hello.stat().st_mode & 0o777 == 0o640
    assert find(image, "/srv/mode").read_text() == "mode=single\n/srv\n"
    assert image.config.user == "nobody"
    assert image.config.workdir == "/srv"
    assert sorted(image.config.exposed_ports) == ["8080/tcp", "9090/udp"]

    multi = write(
        project / "multi.yaml",
        f"""
        stages:
          builder:
            base: "{base}"
            workdir: /build
            steps:
              - copy: tool.sh
                to: /build/tool
              - run: "mkdir -p /out && cp /build/tool /out/tool && echo built > /out/stamp"
                cache:
                  - target: /cache
                    id: zlayer-test-cache
          runtime:
            base: "{base}"
            steps:
              - copy: [/out/tool, /out/stamp]
                from: builder
                to: /usr/local/bin/
                owner: "65534:65534"
                chmod: "750"
            entrypoint: ["/usr/local/bin/tool"]
        labels: {{org.example.built-by: zlayer}}
        """,
    )
    result = build(registryd, str(project), "-z", str(multi), "-t", "multi:1")
    assert result.returncode == 0, result.stderr
    image = rootfs(registryd, "multi:1")
    tool = find(image, "/usr/local/bin/tool")
    assert (tool.stat().st_uid, tool.stat().st_gid) == (65534, 65534)
    assert tool.stat().st_mode & 0o777 == 0o750
    assert find(image, "/usr/local/bin/stamp").read_text() == "built\n"
    with pytest.raises(AssertionError):
        find(image, "/build/tool")  # the builder stage's files stay behind
    assert image.config.entrypoint == ["/usr/local/bin/tool"]
    assert image.config.labels["org.example.built-by"] == "zlayer"

    # The builder stage alone, picked by --target.
    staged = build(registryd, str(project), "-z", str(multi), "--target", "builder", "-t", "b:1")
    assert staged.returncode == 0, staged.stderr
    assert find(rootfs(registryd, "b:1"), "/out/stamp").read_text() == "built\n"


# ---------------------------------------------------------------- pipeline


def test_pipeline_builds_a_dependency_first_and_stores_both(
    registryd: Registryd,  # noqa: F811
    project: Path,
    base: str,
) -> None:
    write(project / "Dockerfile.base", f"FROM {base}\nRUN echo base > /base-layer\n")
    write(
        project / "ZImagefile.app",
        """
        base: "${BASE_IMAGE}"
        steps:
          - run: "cat /base-layer > /from-base && echo $APP_NAME > /app-name"
        args: {BASE_IMAGE: ~, APP_NAME: unnamed}
        cmd: ["cat", "/from-base"]
        """,
    )
    pipeline = write(
        project / "ZPipeline.yaml",
        """
        version: "1"
        vars: {REGISTRY: localhost/zlt, VERSION: "0.1"}
        defaults:
          build_args: {APP_NAME: from-defaults}
        images:
          app:
            file: ZImagefile.app
            depends_on: [base]
            tags: ["${REGISTRY}/app:${VERSION}"]
            build_args: {BASE_IMAGE: "${REGISTRY}/base:${VERSION}"}
          base:
            file: Dockerfile.base
            tags: ["${REGISTRY}/base:${VERSION}", "${REGISTRY}/base:latest"]
        """,
    )
    result = registryd.ctl("pipeline", "-f", str(pipeline), "--set", "VERSION=0.2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines.index("wave 0: base") < lines.index("wave 1: app")
    assert any(line.startswith("[app ] ") for line in lines)

    names = {name for image in registryd.images() for name in image["names"]}
    assert {"localhost/zlt/base:0.2", "localhost/zlt/base:latest", "localhost/zlt/app:0.2"} <= names
    app = rootfs(registryd, "localhost/zlt/app:0.2")
    assert find(app, "/from-base").read_text() == "base\n"
    assert find(app, "/app-name").read_text() == "from-defaults\n"

    # --only builds the image and what it depends on; nothing else.
    only = registryd.ctl("pipeline", "-f", str(pipeline), "--only", "base", "--format", "json")
    assert only.returncode == 0, only.stderr
    assert [i["name"] for i in json.loads(only.stdout)["images"]] == ["base"]


# ---------------------------------------------------------------- errors


def test_a_failing_step_is_one_sentence_and_keeps_the_old_image(
    registryd: Registryd,  # noqa: F811
    zlayer_prefix: Paths,
    project: Path,
    base: str,
) -> None:
    good = write(project / "good.yaml", f'base: "{base}"\nsteps:\n  - run: "echo ok > /ok"\n')
    assert build(registryd, str(project), "-z", str(good), "-t", "keep:1").returncode == 0
    before = rootfs(registryd, "keep:1").image.id

    broken = write(
        project / "broken.yaml",
        f"""
        base: "{base}"
        steps:
          - run: "echo starting"
          - run: "echo failing; exit 7"
        """,
    )
    message = registryd.failure("build", str(project), "-z", str(broken), "-t", "keep:1")
    assert "the step `RUN echo failing; exit 7`" in message
    assert f"({broken}:4)" in message and "exit status 7" in message
    assert rootfs(registryd, "keep:1").image.id == before  # nothing half-built under the tag

    write(project / "Dockerfile", f"FROM {base}\nCOPY missing.txt /x\n")
    message = registryd.failure("build", str(project), "-t", "nothing:1")
    assert "COPY missing.txt /x" in message
    assert f"missing.txt is not in the build context {project}" in message
    assert "nothing:1" not in json.dumps(registryd.images())

    typo = write(project / "typo.yaml", f'base: "{base}"\nsteps:\n  - run: ls\n    cahce: []\n')
    message = registryd.failure("build", str(project), "-z", str(typo))
    assert message == (
        f"error: {typo}:4:5: steps[0].cahce: unknown key `cahce` (did you mean `cache`?)"
    )
    message = registryd.failure("build", str(project), "--target", "nope", "-t", "x:1")
    assert "has no named stages" in message or "no stage `nope`" in message
    assert buildah_containers(zlayer_prefix) == []


def test_interrupting_a_build_cancels_it_and_leaves_nothing(
    registryd: Registryd,  # noqa: F811
    zlayer_prefix: Paths,
    project: Path,
    base: str,
) -> None:
    write(project / "Dockerfile", f"FROM {base}\nRUN echo sleeping && sleep 60\n")
    environ = dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address)
    process = subprocess.Popen(
        [find_executable("zlayerctl"), "build", str(project), "-t", "slow:1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        while "sleeping" not in process.stdout.readline():
            assert time.monotonic() < deadline and process.poll() is None
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1
    assert err.strip() == "error: the build of slow:1 was cancelled"
    jobs = json.loads(registryd.call("list_jobs"))
    assert [job["state"] for job in jobs] == ["cancelled"]
    assert "slow:1" not in json.dumps(registryd.images())
    assert buildah_containers(zlayer_prefix) == []
