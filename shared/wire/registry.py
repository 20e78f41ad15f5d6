"""registryd's values: stored images, their configs and root file systems, prune results."""

from __future__ import annotations

from typing import Any, Literal

from shared.wire import Wire


class ImageConfig(Wire, frozen=True):
    """The parts of an OCI image config that shape a container."""

    entrypoint: list[str] = []
    cmd: list[str] = []
    env: list[str] = []  # "NAME=value", as in the image
    workdir: str = ""
    user: str = ""
    exposed_ports: list[str] = []  # "80/tcp"
    stop_signal: str = ""
    labels: dict[str, str] = {}


class ImageInfo(Wire, frozen=True):
    """One stored image."""

    id: str  # the config blob digest, "sha256:..."
    manifest_digest: str
    names: list[str]  # normalised references that point at it
    layers: list[str]  # layer blob digests, base first
    size: int  # bytes of layer blobs
    created: str = ""
    architecture: str = ""
    os: str = ""
    is_wasm: bool = False
    runtime: Literal["oci", "wasm"] = "oci"  # which runtime runs it: crun, or wasmtime


class ImageDetail(Wire, frozen=True):
    """``InspectImage``: the image and its config."""

    image: ImageInfo
    config: ImageConfig
    history: list[dict[str, Any]] = []


class ImageRootfs(Wire, frozen=True):
    """``EnsureImage``: what agentd needs to build a replica's root file system."""

    image: ImageInfo
    config: ImageConfig
    lower_dirs: list[str]  # unpacked layer directories, topmost first (overlayfs order)


class PushResult(Wire, frozen=True):
    """A push job's result (``JobInfo.result``): where the image went."""

    reference: str  # the destination, normalised: registry/repository:tag
    digest: str  # the pushed manifest's digest
    id: str  # the image's config blob digest


WasmKind = Literal["module", "component"]
WasiVersion = Literal["none", "unstable", "preview1", "preview2", "preview3"]


class WasmArtifact(Wire, frozen=True):
    """A WebAssembly binary packed as an OCI artifact (CNCF Wasm layout): exported to a
    directory or pushed (PushWasm's job result)."""

    name: str  # the normalised image reference
    location: str  # the OCI layout directory, or the registry reference pushed to
    manifest_digest: str
    config_digest: str
    layer_digest: str
    size: int  # bytes of the wasm layer
    kind: WasmKind
    os: str  # wasip1 or wasip2
    wasi: WasiVersion


class PruneResult(Wire, frozen=True):
    """``Prune``: what was removed and the bytes it freed."""

    images: list[str] = []  # image ids (or names) removed
    blobs: list[str] = []  # blob digests removed
    bytes: int = 0
