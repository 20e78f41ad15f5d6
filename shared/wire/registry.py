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


RUNTIME_AUTO = "auto"  # BuildRequest.runtime: pick a template from the context's files


class BuildRequest(Wire, frozen=True):
    """``Build``: one image build. At most one of ``dockerfile``, ``zimagefile``,
    ``runtime``; with none, the context's ZImagefile, else its Dockerfile, is built.

    Paths are absolute and read by zlayer-registryd itself, so they must be
    visible to it (under systemd it has a private ``/tmp`` and no ``/home``);
    zlayerctl sends what is not (``Receive``) and names the received copy.
    """

    context: str
    dockerfile: str = ""
    zimagefile: str = ""
    runtime: str = ""  # a template name, or RUNTIME_AUTO
    tags: list[str] = []
    build_args: dict[str, str] = {}
    target: str = ""
    no_cache: bool = False
    format: Literal["oci", "docker"] = "oci"


class BuildResult(Wire, frozen=True):
    """A finished build job's result."""

    id: str  # the image id in the store (sha256 of its config)
    names: list[str]  # every name the stored image now has
    source: str  # what was built: "Dockerfile", "ZImagefile", "runtime template node22"
    seconds: float


class PruneResult(Wire, frozen=True):
    """``Prune``: what was removed and the bytes it freed."""

    images: list[str] = []  # image ids (or names) removed
    blobs: list[str] = []  # blob digests removed
    bytes: int = 0
