"""The OCI artifact of one WebAssembly binary: packing it, and writing it as an OCI layout.

Owns the CNCF TAG Runtime Wasm layout: one ``application/wasm`` layer and a
config (``application/vnd.wasm.config.v0+json``) with created, author,
architecture ``wasm``, os ``wasip1`` or ``wasip2``, ``layerDigests`` and, for
a component, its imports and exports; :func:`build_artifact` packs a binary
so, :func:`write_layout` writes it as an OCI image layout directory, and
:func:`export_layout` is both for ``zlayerctl wasm export``, which runs as
the user with no daemon. registryd pushes the same blobs and manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.bus import InvalidArgumentError, NotFoundError
from shared.reference import InvalidReferenceError, parse_reference
from shared.wasm import WasmError, WasmInfo, validate
from shared.wire.registry import WasmArtifact

WASM_CONFIG_MEDIA_TYPE = "application/vnd.wasm.config.v0+json"
WASM_LAYER_MEDIA_TYPE = "application/wasm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
WASM_FILE = "app.wasm"  # the binary's name in a layer, and in its unpacked layer directory


@dataclass(frozen=True)
class Artifact:
    """The blobs of one binary packed in the CNCF Wasm layout."""

    name: str  # normalised reference
    info: WasmInfo
    layer: bytes
    config: bytes
    manifest: bytes

    @property
    def manifest_digest(self) -> str:
        return digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return digest(self.config)

    def describe(self, location: str) -> WasmArtifact:
        return WasmArtifact(
            name=self.name,
            location=location,
            manifest_digest=self.manifest_digest,
            config_digest=self.config_digest,
            layer_digest=self.info.digest,
            size=len(self.layer),
            kind=self.info.kind,
            os=self.info.os,
            wasi=self.info.wasi,
        )


def digest(data: bytes) -> str:
    """The OCI digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


def artifact_name(name: str) -> str:
    """The normalised reference an artifact is named by; a digest is refused."""
    try:
        reference = parse_reference(name.strip())
    except InvalidReferenceError as exc:
        raise InvalidArgumentError(str(exc)) from None
    if reference.digest is not None:
        raise InvalidArgumentError(
            f"{name} names a digest; an artifact is named by a repository and tag"
        )
    return str(reference)


def build_artifact(
    data: bytes, label: str, name: str, author: str = "", created: datetime | None = None
) -> Artifact:
    """Validate ``data`` (wasmtime) and pack it; ``label`` names it in errors."""
    try:
        info = validate(data, label)
    except WasmError as exc:
        raise InvalidArgumentError(str(exc)) from None
    reference = artifact_name(name)
    when = (created or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    config: dict[str, Any] = {
        "created": when,
        "architecture": "wasm",
        "os": info.os,
        "layerDigests": [info.digest],
    }
    if author:
        config["author"] = author
    if info.kind == "component":
        config["component"] = {
            "imports": [i.name for i in info.imports],
            "exports": [e.name for e in info.exports],
        }
    config_bytes = _json(config)
    title = Path(label).name if label.endswith(".wasm") else WASM_FILE
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": WASM_CONFIG_MEDIA_TYPE,
            "digest": digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": WASM_LAYER_MEDIA_TYPE,
                "digest": info.digest,
                "size": len(data),
                "annotations": {"org.opencontainers.image.title": title},
            }
        ],
        "annotations": {"org.opencontainers.image.created": when},
    }
    return Artifact(reference, info, data, config_bytes, _json(manifest))


def write_layout(artifact: Artifact, directory: Path) -> None:
    """Write ``artifact`` as an OCI image layout at ``directory`` (absent or empty).

    It is assembled beside the target and renamed into place, so a failure
    leaves nothing half-written.
    """
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise InvalidArgumentError(
            f"{directory} already exists and is not an empty directory; choose another output"
        )
    if not directory.parent.is_dir():
        raise InvalidArgumentError(f"{directory.parent} does not exist")
    tag = parse_reference(artifact.name).tag or "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": artifact.manifest_digest,
                "size": len(artifact.manifest),
                "annotations": {
                    "io.containerd.image.name": artifact.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    work = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:12]}"
    try:
        blobs = work / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        (work / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}\n')
        (work / "index.json").write_bytes(_json(index))
        for blob in (artifact.layer, artifact.config, artifact.manifest):
            (blobs / digest(blob).removeprefix("sha256:")).write_bytes(blob)
        if directory.exists():
            directory.rmdir()
        os.rename(work, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_binary(path: str) -> bytes:
    """The bytes of the file at ``path`` (absolute, as the daemon sees it)."""
    file = Path(path)
    if not file.is_absolute():
        raise InvalidArgumentError(f"{path} is not an absolute path")
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgumentError(f"{path} is a directory, not a WebAssembly file") from None


def export_layout(path: str, name: str, output: str, author: str) -> WasmArtifact:
    """``zlayerctl wasm export``: the binary at ``path`` as an OCI layout at ``output``.

    It runs in zlayerctl itself, as the user: it needs no daemon and writes
    where the user can (registryd under systemd can write only its own state).
    """
    if not Path(output).is_absolute():
        raise InvalidArgumentError(f"{output} is not an absolute path")
    artifact = build_artifact(read_binary(path), path, name, author)
    write_layout(artifact, Path(output))
    return artifact.describe(output)
