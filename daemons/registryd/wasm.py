"""WebAssembly images in zlayer-registryd: recognising them, exporting and pushing artifacts.

A WASM image is told from a container image, in this order, by the
manifest's ``artifactType``, the config's media type
(``application/vnd.wasm.config.v0+json``, the CNCF TAG Runtime layout), or a
layer typed ``application/wasm`` (or ``*+wasm``); its layers must then be
raw WebAssembly (the ``\\0asm`` magic). Such a layer is "unpacked" as one
file, :data:`WASM_FILE`, in its layer directory, so ``EnsureImage`` hands
agentd a directory holding the binary. Images whose platform is wasm/wasi
but whose layers are tars (the runwasi style) are WASM images too, unpacked
as usual.

Export writes a binary as an OCI image layout in the CNCF layout: one
``application/wasm`` layer and a config with created, author, architecture
``wasm``, os ``wasip1`` or ``wasip2``, ``layerDigests`` and, for a
component, its imports and exports. Push sends the same blobs and manifest
with registryd's own distribution client (:meth:`.pull.RegistryClient.upload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from daemons.registryd.distribution import Upload
from daemons.registryd.sources import ArchiveError, SourceImage
from shared.bus import InvalidArgumentError, NotFoundError
from shared.jobs import Job
from shared.reference import InvalidReferenceError, parse_reference
from shared.wasm import MAGIC, WasmArtifact, WasmError, WasmInfo, validate

if TYPE_CHECKING:  # the client imports the store, which imports this module
    from daemons.registryd.client import RegistryClient

log = logging.getLogger("zlayer.registryd.wasm")

Runtime = Literal["oci", "wasm"]

WASM_CONFIG_MEDIA_TYPE = "application/vnd.wasm.config.v0+json"
WASM_LAYER_MEDIA_TYPE = "application/wasm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
WASM_ARTIFACT_TYPES = {WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE}
WASM_PLATFORM_OS = ("wasi", "wasip1", "wasip2")
WASM_FILE = "app.wasm"  # the binary's name inside its unpacked layer directory


def _is_wasm_media_type(media_type: str) -> bool:
    return media_type == WASM_LAYER_MEDIA_TYPE or media_type.endswith("+wasm")


# ---------------------------------------------------------------- recognising


def image_runtime(
    image: SourceImage, document: dict[str, Any], path: str
) -> tuple[Runtime, list[str] | None]:
    """Which runtime an image is for, and the layer diff ids of a raw-wasm artifact.

    ("wasm", digests) for an artifact whose layers are WebAssembly binaries
    (their diff ids are their digests: they are not compressed); ("wasm",
    None) for a wasm-platform image of tar layers; ("oci", None) otherwise.
    """
    manifest: Any = {}
    if image.manifest is not None:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            manifest = json.loads(image.manifest)
    artifact_type = str(manifest.get("artifactType") or "") if isinstance(manifest, dict) else ""
    typed_layers = [_is_wasm_media_type(layer.media_type) for layer in image.layers]
    if (
        artifact_type in WASM_ARTIFACT_TYPES
        or _is_wasm_media_type(artifact_type)
        or image.config.media_type == WASM_CONFIG_MEDIA_TYPE
        or any(typed_layers)
    ):
        return "wasm", _wasm_layer_digests(image, path)
    architecture = str(document.get("architecture") or "")
    if architecture == "wasm" or str(document.get("os") or "") in WASM_PLATFORM_OS:
        return "wasm", None
    return "oci", None


def _wasm_layer_digests(image: SourceImage, path: str) -> list[str]:
    if not image.layers:
        raise ArchiveError(f"the WASM artifact in {path} has no layers")
    digests: list[str] = []
    for number, layer in enumerate(image.layers, start=1):
        with layer.open() as handle:
            head = handle.read(len(MAGIC))
        if head != MAGIC:
            shown = layer.media_type or "no media type"
            raise ArchiveError(
                f"layer {number} of the WASM artifact in {path} ({shown}) is not a WebAssembly "
                "binary: it does not start with the \\0asm magic"
            )
        if layer.digest is None:
            raise ArchiveError(f"layer {number} of the WASM artifact in {path} has no digest")
        digests.append(layer.digest)
    return digests


def is_wasm_blob(blob: Path) -> bool:
    with open(blob, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def unpack_wasm_layer(blob: Path, work: Path) -> None:
    """A raw-wasm layer's directory: the binary alone, as :data:`WASM_FILE`."""
    work.mkdir(mode=0o755)
    target = work / WASM_FILE
    shutil.copyfile(blob, target)
    os.chmod(target, 0o644)
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())


# ---------------------------------------------------------------- artifacts


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
        return _digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return _digest(self.config)

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


def _digest(data: bytes) -> str:
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
            "digest": _digest(config_bytes),
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
            (blobs / _digest(blob).removeprefix("sha256:")).write_bytes(blob)
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


# ---------------------------------------------------------------- push


async def push_job(
    job: Job,
    artifact: Artifact,
    work_dir: Path,
    client: RegistryClient,
    auth: str,
    tls_verify: bool,
) -> str:
    """The work of a ``PushWasm`` job: the artifact's blobs and manifest to its registry.

    The blobs are written to a directory of the job's own and sent by
    registryd's own distribution client, so credentials from ``zlayerctl
    login`` (or ``auth`` from the caller), insecure-registry settings and
    token reuse are the same as for any image push. ``tls_verify=False``
    speaks plain HTTP to the registry.
    """
    dest = parse_reference(artifact.name)
    blob_dir = work_dir / f"wasm-push-{uuid.uuid4().hex}"

    def write_blobs() -> list[Upload]:
        blob_dir.mkdir(parents=True)
        uploads = []
        for blob, label in ((artifact.config, "config"), (artifact.layer, "wasm")):
            digest = _digest(blob)
            path = blob_dir / digest.removeprefix("sha256:")
            path.write_bytes(blob)
            uploads.append(Upload(digest, len(blob), label, path))
        return uploads

    try:
        uploads = await asyncio.to_thread(write_blobs)
        await client.upload(
            job,
            dest,
            auth,
            uploads,
            artifact.manifest,
            OCI_MANIFEST,
            artifact.manifest_digest,
            plain_http=not tls_verify,
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, blob_dir, True)
    log.info("pushed %s (%s) to %s", artifact.info.digest, artifact.info.kind, artifact.name)
    return artifact.describe(artifact.name).model_dump_json()
