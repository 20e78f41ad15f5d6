"""Runtime templates: complete Dockerfiles for common stacks, and picking one for a project.

Each template is cache-friendly: the dependency manifests are copied and
installed before the sources, with package caches as cache mounts, so editing
a source file rebuilds only the last steps. ``render(name, context)`` fills the
few details a template takes from the project (the entry file, a Rust
binary's name); :func:`detect` picks a template from the files in a context,
in a fixed order (bun, deno, node, rust, go, python).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Template:
    name: str
    base: str  # the image the result runs on
    description: str
    detected_by: str  # the files --runtime-auto looks for, as a person reads it


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("node20", "node:20-alpine", "Node.js 20 on Alpine, npm start", "package.json"),
        Template("node22", "node:22-alpine", "Node.js 22 on Alpine, npm start", "package.json"),
        Template(
            "python312",
            "python:3.12-slim-bookworm",
            "Python 3.12 on Debian slim",
            "pyproject.toml or requirements.txt (.python-version 3.12)",
        ),
        Template(
            "python313",
            "python:3.13-slim-bookworm",
            "Python 3.13 on Debian slim",
            "pyproject.toml or requirements.txt",
        ),
        Template("rust", "scratch", "a static musl binary built with cargo", "Cargo.toml"),
        Template("go", "scratch", "a static binary built with go build", "go.mod"),
        Template("deno", "denoland/deno:2.1.4", "Deno 2", "deno.json or deno.jsonc"),
        Template("bun", "oven/bun:1-alpine", "Bun 1", "bun.lockb or bun.lock"),
    )
}

_NODE = """\
FROM node:{version}-alpine AS build
WORKDIR /app
COPY package.json package-lock.json* npm-shrinkwrap.json* ./
RUN --mount=type=cache,target=/root/.npm,id=npm if [ -f package-lock.json ] || [ -f npm-shrinkwrap.json ]; then npm ci; else npm install; fi
COPY . .
RUN npm run build --if-present && npm prune --omit=dev

FROM node:{version}-alpine
ENV NODE_ENV=production
WORKDIR /app
COPY --from=build --chown=node:node /app /app
USER node
EXPOSE 3000
CMD ["npm", "start"]
"""  # noqa: E501

_PYTHON = """\
FROM python:{version}-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY {manifests} ./
RUN --mount=type=cache,target=/root/.cache/pip,id=pip {install_deps}
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip,id=pip {install_project}
RUN useradd --system --uid 10001 --home-dir /app app
USER app
EXPOSE 8000
CMD {cmd}
"""

_RUST = """\
FROM rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock* ./
# Dependencies first, against a stand-in main, so source edits keep them cached.
RUN --mount=type=cache,target=/usr/local/cargo/registry,id=cargo-registry \\
    mkdir -p src && echo 'fn main() {{}}' > src/main.rs && \\
    cargo build --release && rm -rf src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,id=cargo-registry \\
    touch src/main.rs && cargo build --release && \\
    mkdir -p /out && cp target/release/{binary} /out/app

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/app /app
USER 65534:65534
ENTRYPOINT ["/app"]
"""

_GO = """\
FROM golang:1.23-alpine AS build
WORKDIR /src
COPY go.mod go.sum* ./
RUN --mount=type=cache,target=/go/pkg/mod,id=go-mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod,id=go-mod \\
    --mount=type=cache,target=/root/.cache/go-build,id=go-build \\
    CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/app .

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/app /app
USER 65534:65534
ENTRYPOINT ["/app"]
"""

_DENO = """\
FROM denoland/deno:2.1.4
ENV DENO_DIR=/deno-dir
WORKDIR /app
COPY deno.json* deno.jsonc* deno.lock* ./
RUN deno install
COPY . .
RUN deno cache {entry}
USER deno
EXPOSE 8000
CMD ["run", "--allow-net", "--allow-env", "--allow-read", "{entry}"]
"""

_BUN = """\
FROM oven/bun:1-alpine
WORKDIR /app
COPY package.json bun.lockb* bun.lock* ./
RUN --mount=type=cache,target=/root/.bun/install/cache,id=bun bun install --production
COPY . .
USER bun
EXPOSE 3000
CMD ["bun", "run", "start"]
"""


def names() -> list[str]:
    return list(TEMPLATES)


def render(name: str, context: Path | None = None) -> str:
    """The Dockerfile of template ``name``, with details taken from ``context`` if given."""
    if name not in TEMPLATES:
        raise KeyError(name)
    if name in ("node20", "node22"):
        return _NODE.format(version=name.removeprefix("node"))
    if name in ("python312", "python313"):
        return _python(name.removeprefix("python").replace("3", "3.", 1), context)
    if name == "rust":
        return _RUST.format(binary=_cargo_binary(context))
    if name == "go":
        return _GO
    if name == "deno":
        return _DENO.format(entry=_first_file(context, ("main.ts", "main.js", "mod.ts")))
    return _BUN


def _python(version: str, context: Path | None) -> str:
    def has(name: str) -> bool:
        # Without a project to look at, the template shows the requirements.txt flavour.
        return (context / name).is_file() if context else name == "requirements.txt"

    requirements, pyproject = has("requirements.txt"), has("pyproject.toml")
    manifests = (
        " ".join(
            f
            for f, present in (("requirements.txt", requirements), ("pyproject.toml", pyproject))
            if present
        )
        or "requirements.txt"
    )
    # With only a pyproject, its dependencies install with the project itself.
    install_deps = "pip install -r requirements.txt" if requirements else "true"
    install_project = (
        "pip install --no-deps ."
        if pyproject and requirements
        else ("pip install ." if pyproject else "true")
    )
    entry = _first_file(context, ("main.py", "app.py", "server.py"))
    return _PYTHON.format(
        version=version,
        manifests=manifests,
        install_deps=install_deps,
        install_project=install_project,
        cmd=json.dumps(["python", entry]),
    )


def _first_file(context: Path | None, candidates: tuple[str, ...]) -> str:
    if context is not None:
        for candidate in candidates:
            if (context / candidate).is_file():
                return candidate
    return candidates[0]


def _cargo_binary(context: Path | None) -> str:
    if context is None:
        return "app"
    try:
        with open(context / "Cargo.toml", "rb") as handle:
            manifest = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return "app"
    bins = manifest.get("bin")
    if isinstance(bins, list) and bins and isinstance(bins[0], dict) and bins[0].get("name"):
        return str(bins[0]["name"])
    package = manifest.get("package")
    if isinstance(package, dict) and isinstance(package.get("name"), str):
        return str(package["name"])
    return "app"


def detect(context: Path) -> tuple[str, str] | None:
    """The template for the project in ``context`` and the file that decided it, or None."""

    def has(name: str) -> bool:
        return (context / name).is_file()

    for lockfile in ("bun.lockb", "bun.lock"):
        if has(lockfile):
            return "bun", lockfile
    for config in ("deno.json", "deno.jsonc"):
        if has(config):
            return "deno", config
    if has("package.json"):
        return _node_version(context / "package.json"), "package.json"
    if has("Cargo.toml"):
        return "rust", "Cargo.toml"
    if has("go.mod"):
        return "go", "go.mod"
    for manifest in ("pyproject.toml", "requirements.txt"):
        if has(manifest):
            return _python_version(context), manifest
    return None


def _node_version(package_json: Path) -> str:
    """node20 when package.json's engines.node asks for 20 (and not 22), else node22."""
    try:
        engines = json.loads(package_json.read_text()).get("engines") or {}
        wanted = str(engines.get("node", ""))
    except (OSError, ValueError, AttributeError):
        return "node22"
    majors = set(re.findall(r"(?<![\d.])(\d+)(?=[.x*\s]|$)", wanted))
    return "node20" if "20" in majors and "22" not in majors else "node22"


def _python_version(context: Path) -> str:
    """python312 when .python-version says 3.12, else python313."""
    try:
        pinned = (context / ".python-version").read_text().strip()
    except OSError:
        return "python313"
    return "python312" if pinned.startswith("3.12") else "python313"
