"""WebAssembly images in zlayer-registryd: recognising them and pushing artifacts.

A WASM image is told from a container image, in this order, by the
manifest's ``artifactType``, the config's media type
(``application/vnd.wasm.config.v0+json``, the CNCF TAG Runtime layout), or a
layer typed ``application/wasm`` (or ``*+wasm``); its layers must then be
raw WebAssembly (the ``\\0asm`` magic). Such a layer is "unpacked" as one
file, :data:`WASM_FILE`, in its layer directory, so ``EnsureImage`` hands
agentd a directory holding the binary. Images whose platform is wasm/wasi
but whose layers are tars (the runwasi style) are WASM images too, unpacked
as usual.

An artifact (the CNCF layout, packed by :mod:`shared.wasm_artifact`, which
also writes it as an OCI layout for ``zlayerctl wasm export``) is pushed as
its blobs and manifest with registryd's own distribution client
(:meth:`.client.RegistryClient.upload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from daemons.registryd.distribution import Upload
from daemons.registryd.sources import ArchiveError, SourceImage
from shared.jobs import Job
from shared.reference import parse_reference
from shared.wasm import MAGIC
from shared.wasm_artifact import (
    OCI_MANIFEST,
    WASM_CONFIG_MEDIA_TYPE,
    WASM_FILE,
    WASM_LAYER_MEDIA_TYPE,
    Artifact,
    digest,
)
from shared.wire import encode

if TYPE_CHECKING:  # the client imports the store, which imports this module
    from daemons.registryd.client import RegistryClient

log = logging.getLogger("zlayer.registryd.wasm")

Runtime = Literal["oci", "wasm"]

WASM_ARTIFACT_TYPES = {WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE}
WASM_PLATFORM_OS = ("wasi", "wasip1", "wasip2")


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
    # A pulled image's stored blobs carry no media types: its manifest's do.
    config = manifest.get("config") if isinstance(manifest, dict) else None
    config_type = str(config.get("mediaType") or "") if isinstance(config, dict) else ""
    listed = manifest.get("layers") if isinstance(manifest, dict) else None
    listed_types = [
        str(layer.get("mediaType") or "")
        for layer in (listed if isinstance(listed, list) else [])
        if isinstance(layer, dict)
    ]
    if (
        artifact_type in WASM_ARTIFACT_TYPES
        or _is_wasm_media_type(artifact_type)
        or image.config.media_type == WASM_CONFIG_MEDIA_TYPE
        or config_type == WASM_CONFIG_MEDIA_TYPE
        or any(typed_layers)
        or any(_is_wasm_media_type(kind) for kind in listed_types)
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
            blob_digest = digest(blob)
            path = blob_dir / blob_digest.removeprefix("sha256:")
            path.write_bytes(blob)
            uploads.append(Upload(blob_digest, len(blob), label, path))
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
    return encode(artifact.describe(artifact.name))
