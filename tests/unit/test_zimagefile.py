"""ZImagefile reading, its located errors, its Dockerfile, and the runtime templates."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from shared.buildfile import runtimes
from shared.buildfile.located import BuildFileError
from shared.buildfile.zimagefile import (
    MultiStageFile,
    RuntimeFile,
    SingleStageFile,
    load_zimagefile,
    parse_zimagefile,
    to_dockerfile,
)


def dockerfile(text: str, context: Path | None = None) -> str:
    return to_dockerfile(parse_zimagefile(textwrap.dedent(text)), context).text


def error(text: str) -> str:
    with pytest.raises(BuildFileError) as caught:
        to_dockerfile(parse_zimagefile(textwrap.dedent(text).lstrip(), "ZImagefile"))
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- the four modes


def test_the_formats_multi_stage_example() -> None:
    loaded = parse_zimagefile(
        textwrap.dedent(
            """
            version: "1"
            stages:
              builder:
                base: "rust:1.90-bookworm"
                workdir: /build
                steps:
                  - copy: "."
                    to: /build
                  - run: "cargo build --release"
                    cache:
                      - target: /usr/local/cargo/registry
                        id: cargo-registry
                        sharing: shared
              runtime:
                base: "debian:bookworm-slim"
                steps:
                  - copy: target/release/myapp
                    from: builder
                    to: /usr/local/bin/myapp
                    chmod: "755"
                cmd: ["/usr/local/bin/myapp"]
            expose: 8080
            """
        )
    )
    assert isinstance(loaded.model, MultiStageFile) and loaded.mode == "multi-stage"
    result = to_dockerfile(loaded)
    assert result.stages == ["builder", "runtime"]
    assert result.text.splitlines() == [
        "FROM rust:1.90-bookworm AS builder",
        "WORKDIR /build",
        'COPY [".", "/build"]',
        "RUN --mount=type=cache,target=/usr/local/cargo/registry,id=cargo-registry,"
        "sharing=shared cargo build --release",
        "FROM debian:bookworm-slim AS runtime",
        'COPY --from=builder --chmod=755 ["target/release/myapp", "/usr/local/bin/myapp"]',
        'CMD ["/usr/local/bin/myapp"]',
        "EXPOSE 8080",
    ]
    # A failing step is traced back to its line in the ZImagefile.
    run = result.text.splitlines()[3]
    assert result.origin_of(run) == "ZImagefile:10"
    assert result.origin_of('COPY --from=builder --chmod=755 ["target/release/myapp", '
                            '"/usr/local/bin/myapp"]') == "ZImagefile:18"  # fmt: skip
    assert result.origin_of("RUN something else") == ""


def test_single_stage_with_every_kind_of_step_and_metadata() -> None:
    text = dockerfile(
        """
        base: alpine:3.20
        workdir: /app
        env: {PORT: 8080, DEBUG: false}
        args: {VERSION: "1.0", TOKEN: ~}
        steps:
          - copy: [package.json, "my file.txt"]
            to: /app/
            owner: "1000:1000"
          - add: https://example.com/a.tar.gz
            to: /opt/
          - run: ["npm", "ci"]
          - run: |
              echo one
              echo "two"
          - env: {NODE_ENV: production}
          - workdir: /app/dist
          - user: node
        user: "1000"
        entrypoint: node server.js
        cmd: ["--port", "8080"]
        labels: {org.opencontainers.image.title: "my app"}
        volumes: /data
        healthcheck: {cmd: ["wget", "-q", "localhost:8080"], interval: 5s, retries: 3}
        stopsignal: SIGINT
        """
    )
    assert text.splitlines() == [
        'ARG VERSION="1.0"',
        "ARG TOKEN",
        "FROM alpine:3.20",
        "ARG VERSION",
        "ARG TOKEN",
        "WORKDIR /app",
        'ENV PORT="8080" DEBUG="false"',
        'COPY --chown=1000:1000 ["package.json", "my file.txt", "/app/"]',
        'ADD ["https://example.com/a.tar.gz", "/opt/"]',
        'RUN ["npm", "ci"]',
        'RUN ["/bin/sh", "-c", "echo one\\necho \\"two\\"\\n"]',
        'ENV NODE_ENV="production"',
        "WORKDIR /app/dist",
        "USER node",
        'LABEL org.opencontainers.image.title="my app"',
        'VOLUME ["/data"]',
        'HEALTHCHECK --interval=5s --retries=3 CMD ["wget", "-q", "localhost:8080"]',
        "STOPSIGNAL SIGINT",
        "USER 1000",
        "ENTRYPOINT node server.js",
        'CMD ["--port", "8080"]',
    ]


def test_runtime_mode_expands_the_template_and_adds_metadata(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("flask\n")
    (tmp_path / "app.py").write_text("print('hi')\n")
    (tmp_path / "ZImagefile").write_text("runtime: python312\nexpose: 5000\nenv: {A: b}\n")
    loaded = load_zimagefile(tmp_path / "ZImagefile")
    assert isinstance(loaded.model, RuntimeFile)
    text = to_dockerfile(loaded, tmp_path).text
    assert text.startswith("# runtime template python312\nFROM python:3.12-slim-bookworm\n")
    assert 'CMD ["python", "app.py"]' in text
    assert text.endswith('ENV A="b"\nEXPOSE 5000\n')


def test_a_stage_can_start_from_an_earlier_stage() -> None:
    text = dockerfile(
        """
        stages:
          deps: {base: "node:22-alpine", steps: [{run: npm ci}]}
          test: {from: deps, steps: [{run: npm test}]}
        """
    )
    assert "FROM deps AS test" in text.splitlines()


def test_wasm_mode_parses_and_points_to_wasm_build() -> None:
    loaded = parse_zimagefile("wasm: {target: preview1, optimize: true}\n")
    assert loaded.mode == "wasm"
    assert error("wasm: {target: preview2}\n") == (
        "ZImagefile:1:1: wasm: this ZImagefile is a WebAssembly build; "
        "build it with `zlayerctl wasm build`"
    )
    assert "`preview3` is" not in error("wasm: {target: preview3}\n")
    assert "preview1" in error("wasm: {target: preview3}\n")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "base: x\nsteps:\n  - run: ls\n    cahce: []\n",
            "ZImagefile:4:5: steps[0].cahce: unknown key `cahce` (did you mean `cache`?)",
        ),
        ("bse: alpine\nsteps: []\n",
         "ZImagefile:1:1: bse: unknown key `bse` (did you mean `base`?)"),
        (
            "stages:\n  a:\n    base: x\n    stpes: []\n",
            "ZImagefile:4:5: stages.a.stpes: unknown key `stpes` (did you mean `steps`?)",
        ),
        (
            "stages:\n  build:\n    base: x\n  run:\n    base: y\n    steps:\n"
            "      - copy: /out\n        from: biuld\n        to: /\n",
            "ZImagefile:8:15: stages.run.steps[0].from: there is no stage `biuld` before this one "
            "(stages so far: build) (did you mean `build`?)",
        ),
        (
            "stages:\n  a:\n    from: b\n  b:\n    base: x\n",
            "ZImagefile:3:11: stages.a.from: stage `b` comes later; "
            "a stage can only use stages defined before it",
        ),
        (
            "base: x\nsteps:\n  - run: ls\n    copy: a\n",
            "ZImagefile:3:5: steps[0]: a step does exactly one of run, copy, add, env, workdir, "
            "user; this one has run and copy",
        ),
        (
            "base: x\nsteps:\n  - copy: a\n",
            "ZImagefile:3:5: steps[0]: a `copy` step needs `to:` (where the files go)",
        ),
        (
            "base: x\nsteps:\n  - run: ls\n    owner: '1:1'\n",
            "ZImagefile:3:5: steps[0]: `owner` does not apply to a `run` step",
        ),
        (
            "base: x\nsteps:\n  - copy: a\n    to: /a\n    chmod: 0755\n",
            "ZImagefile:5:12: steps[0].chmod: YAML read this mode as the number 493 "
            '(0755 is octal to it); write the mode quoted, like "755"',
        ),
        (
            "runtime: nod22\n",
            "ZImagefile:1:10: runtime: `nod22` is not a runtime template; one of node20, node22, "
            "python312, python313, rust, go, deno, bun (did you mean `node22`?)",
        ),
        (
            "runtime: go\nstages: {}\n",
            "ZImagefile:2:1: stages: `runtime` and `stages` are different kinds of ZImagefile; "
            "use one",
        ),
        ("base: x\nexpose: http\n",
         "ZImagefile:2:9: expose: `http` is not a port; write 8080 or 8080/udp"),
        ("base: x\nsteps: [ls\n", "ZImagefile:3:1: invalid YAML: while parsing a flow sequence "
         "expected ',' or ']', but got '<stream end>'"),
        ("- a\n", "ZImagefile:1:1: a ZImagefile is a mapping with one of `runtime`, `base` "
         "(with `steps`), `stages` or `wasm`, not a list"),
        ("version: '1'\n", "ZImagefile:1:1: a ZImagefile needs one of `runtime`, `base` "
         "(with `steps`), `stages` or `wasm`"),
        ("base: x\nbase: y\n", "ZImagefile:2:1: base: duplicate key `base` (first at line 1)"),
        ("steps: []\n", "ZImagefile:1:1: a ZImagefile needs one of `runtime`, `base` "
         "(with `steps`), `stages` or `wasm`"),
    ],
)  # fmt: skip
def test_errors_are_one_located_sentence(text: str, expected: str) -> None:
    assert error(text) == expected


def test_several_problems_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "ZImagefile"
    path.write_text("base: x\nsteps:\n  - run: 1\n  - copy: [a, 2]\n    to: 3\nuser: [x]\n")
    with pytest.raises(BuildFileError) as caught:
        load_zimagefile(path)
    assert str(caught.value).startswith(f"{path}:")
    assert str(caught.value).endswith("more problems)")
    assert len(caught.value.issues) >= 3


def test_a_missing_file_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(BuildFileError, match=r"ZImagefile: no such ZImagefile$"):
        load_zimagefile(tmp_path / "ZImagefile")


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO with no writer used to block the build forever; /dev/zero read without end."""
    fifo = tmp_path / "ZImagefile"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(BuildFileError, match=r": is not a regular file \(a pipe, a device"):
            load_zimagefile(path)


def test_a_file_past_the_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "ZImagefile"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(BuildFileError, match=r"is larger than 1 MiB, the most a ZImagefile may"):
        load_zimagefile(big)


# ---------------------------------------------------------------- runtime templates


@pytest.mark.parametrize("name", runtimes.names())
def test_every_template_is_a_complete_cache_friendly_dockerfile(name: str) -> None:
    text = runtimes.render(name)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("FROM ")
    assert any(line.startswith(("CMD ", "ENTRYPOINT ")) for line in lines)
    # Dependency manifests are copied (and installed) before the sources.
    copies = [
        i for i, line in enumerate(lines) if line.startswith("COPY ") and "--from" not in line
    ]
    assert len(copies) >= 2
    assert "COPY . ." in lines[copies[1]] and "COPY . ." not in lines[copies[0]]
    install = next(i for i, line in enumerate(lines) if line.startswith("RUN ") and i > copies[0])
    assert install < copies[1]
    # A runtime template needs no ZLayer-specific syntax: it is a plain Dockerfile.
    assert "${" not in text
    assert json.loads(lines[-1].split(" ", 1)[1])  # exec-form CMD/ENTRYPOINT


def test_templates_take_details_from_the_project(tmp_path: Path) -> None:
    (tmp_path / "Cargo.toml").write_text('[package]\nname = "hello-svc"\nversion = "0.1.0"\n')
    assert "cp target/release/hello-svc /out/app" in runtimes.render("rust", tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = runtimes.render("python313", tmp_path)
    assert "COPY pyproject.toml ./" in python and "pip install ." in python
    assert runtimes.render("node20").startswith("FROM node:20-alpine AS build")


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"package.json": "{}"}, ("node22", "package.json")),
        ({"package.json": '{"engines": {"node": ">=20 <21"}}'}, ("node20", "package.json")),
        ({"package.json": '{"engines": {"node": "20.x || 22.x"}}'}, ("node22", "package.json")),
        ({"package.json": "{}", "bun.lockb": ""}, ("bun", "bun.lockb")),
        ({"deno.json": "{}", "package.json": "{}"}, ("deno", "deno.json")),
        ({"Cargo.toml": ""}, ("rust", "Cargo.toml")),
        ({"go.mod": "module x\n"}, ("go", "go.mod")),
        ({"requirements.txt": ""}, ("python313", "requirements.txt")),
        ({"pyproject.toml": "", ".python-version": "3.12.4\n"}, ("python312", "pyproject.toml")),
        ({"README.md": ""}, None),
    ],
)
def test_runtime_auto_detection(
    tmp_path: Path, files: dict[str, str], expected: tuple[str, str] | None
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    assert runtimes.detect(tmp_path) == expected


def test_single_stage_model_type() -> None:
    assert isinstance(parse_zimagefile("base: x\n").model, SingleStageFile)
