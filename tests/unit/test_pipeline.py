"""ZPipeline reading: variables, defaults, waves, --only, and errors before anything builds."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shared.buildfile.located import BuildFileError
from shared.buildfile.pipeline import load_pipeline


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "docker").mkdir()
    for name in ("Dockerfile.base", "Dockerfile.worker", "ZImagefile.app", "ZImagefile.web"):
        (tmp_path / "docker" / name).write_text("")
    return tmp_path


def write(project: Path, text: str) -> Path:
    path = project / "ZPipeline.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


EXAMPLE = """
version: "1"
vars:
  VERSION: "1.0.0"
  REGISTRY: "registry.example.com/org"
defaults:
  format: oci
  build_args: {RUST_VERSION: "1.90", MODE: release}
images:
  base:
    file: docker/Dockerfile.base
    context: "."
    tags: ["${REGISTRY}/base:${VERSION}", "${REGISTRY}/base:latest"]
  app:
    file: docker/ZImagefile.app
    depends_on: [base]
    tags: ["${REGISTRY}/app:${VERSION}"]
    build_args: {MODE: debug}
    format: docker
  worker:
    file: docker/Dockerfile.worker
    depends_on: [base]
    no_cache: true
  web:
    file: docker/ZImagefile.web
    depends_on: [app, worker]
push:
  after_all: true
"""


def test_the_formats_example(project: Path) -> None:
    pipeline = load_pipeline(write(project, EXAMPLE))
    base, app = pipeline.images["base"], pipeline.images["app"]
    assert base.tags == [
        "registry.example.com/org/base:1.0.0",
        "registry.example.com/org/base:latest",
    ]
    assert base.file == project / "docker/Dockerfile.base" and not base.is_zimagefile
    assert app.is_zimagefile and app.context == project
    # defaults merged under the image's own values
    assert base.build_args == {"RUST_VERSION": "1.90", "MODE": "release"}
    assert app.build_args == {"RUST_VERSION": "1.90", "MODE": "debug"}
    assert (base.format, app.format) == ("oci", "docker")
    assert (base.no_cache, pipeline.images["worker"].no_cache) == (False, True)
    assert pipeline.push_after_all
    assert pipeline.waves() == [["base"], ["app", "worker"], ["web"]]


def test_set_overrides_vars(project: Path) -> None:
    pipeline = load_pipeline(write(project, EXAMPLE), {"VERSION": "2.0", "EXTRA": "x"})
    assert pipeline.images["app"].tags == ["registry.example.com/org/app:2.0"]


def test_only_takes_what_the_images_depend_on(project: Path) -> None:
    pipeline = load_pipeline(write(project, EXAMPLE))
    assert pipeline.select(["app"]) == ["base", "app"]
    assert pipeline.waves(pipeline.select(["app"])) == [["base"], ["app"]]
    assert pipeline.select(["web"]) == ["base", "app", "worker", "web"]
    assert pipeline.select(["base", "worker"]) == ["base", "worker"]
    assert pipeline.select([]) == ["base", "app", "worker", "web"]
    with pytest.raises(BuildFileError, match=r"--only names `ap`, .* \(did you mean `app`\?\)"):
        pipeline.select(["ap"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            """
            images:
              a: {file: docker/Dockerfile.base, depends_on: [b]}
              b: {file: docker/Dockerfile.base, depends_on: [c]}
              c: {file: docker/Dockerfile.base, depends_on: [a]}
            """,
            "ZPipeline.yaml:2:49: images.a.depends_on: the images a -> b -> c -> a depend on "
            "each other in a cycle",
        ),
        (
            """
            images:
              base: {file: docker/Dockerfile.base}
              app: {file: docker/Dockerfile.base, depends_on: [bsae]}
            """,
            "ZPipeline.yaml:3:52: images.app.depends_on[0]: unknown image `bsae` "
            "(images: base, app) (did you mean `base`?)",
        ),
        (
            """
            images:
              app: {file: docker/Dockerfile.base, depends_on: [app]}
            """,
            "ZPipeline.yaml:2:52: images.app.depends_on[0]: image `app` cannot depend on itself",
        ),
        (
            """
            vars: {REGISTRY: r.example.com}
            images:
              app: {file: docker/Dockerfile.base, tags: ["${REGISTRY}/app:${VERSON}"]}
            """,
            "ZPipeline.yaml:3:46: images.app.tags[0]: unknown variable `${VERSON}` (defined: "
            "REGISTRY); define it in `vars` or with --set",
        ),
        (
            """
            images:
              app: {file: docker/Dockerfile.missing}
            """,
            "ZPipeline.yaml:2:15: images.app.file: no such file docker/Dockerfile.missing",
        ),
        (
            """
            images:
              app: {file: docker/Dockerfile.base, dependson: [x]}
            """,
            "ZPipeline.yaml:2:39: images.app.dependson: unknown key `dependson` "
            "(did you mean `depends_on`?)",
        ),
        (
            """
            images:
              app: {context: .}
            """,
            "ZPipeline.yaml:2:8: images.app.file: required key is missing",
        ),
        (
            """
            defaults: {format: tar}
            images:
              app: {file: docker/Dockerfile.base}
            """,
            "ZPipeline.yaml:1:20: defaults.format: input should be 'oci' or 'docker'",
        ),
        ("images: {}\n", "ZPipeline.yaml:1:9: images: `images` lists no images"),
    ],
)
def test_errors_are_found_before_anything_builds(project: Path, text: str, expected: str) -> None:
    path = write(project, text)
    with pytest.raises(BuildFileError) as caught:
        load_pipeline(path)
    assert str(caught.value) == f"{project}/{expected}"
