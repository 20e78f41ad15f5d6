"""Reading images out of local sources: OCI layouts, oci-archives and ``docker save`` tars.

A source is opened once and describes its images as :class:`SourceImage`:
the names it records, its manifest (OCI) and the blobs it refers to, each
with the digest the source promises for it. Nothing is trusted here: the
store hashes every blob it copies and refuses one that differs.
"""

from __future__ import annotations

import hashlib
import json
import platform
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shared.bus import InvalidArgumentError, NotFoundError

MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
MAX_JSON = 16 << 20  # a manifest or config bigger than this is not one


# sdbus maps each error class to one bus name, so these are aliases, not subclasses.
ArchiveError = InvalidArgumentError  # a source that is not a well-formed image archive


Opener = Callable[[], AbstractContextManager[IO[bytes]]]


@dataclass
class SourceBlob:
    """A blob in the source: how to read it and the digest it must have (None: unknown)."""

    open: Opener
    digest: str | None
    size: int | None = None
    media_type: str = ""


@dataclass
class SourceImage:
    names: list[str]
    config: SourceBlob
    layers: list[SourceBlob]
    manifest: bytes | None = None  # OCI: the manifest as found; docker save: none, one is made
    manifest_digest: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)


def host_platform() -> tuple[str, str]:
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    return "linux", arch


def sha256_hex_of(digest: str) -> str | None:
    """The hex part of a sha256 digest, or None for anything else."""
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or len(hex_part) != 64:
        return None
    try:
        int(hex_part, 16)
    except ValueError:
        return None
    return hex_part.lower()


# ---------------------------------------------------------------- containers


class _Files:
    """The files of a directory or a tar, by relative path."""

    def __init__(self, label: str) -> None:
        self.label = label

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def read_json(self, name: str) -> Any:
        if not self.exists(name):
            raise ArchiveError(f"{self.label} has no {name}")
        if (self.size(name) or 0) > MAX_JSON:
            raise ArchiveError(f"{name} in {self.label} is too large to be image metadata")
        with self.open(name) as handle:
            data = handle.read(MAX_JSON + 1)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ArchiveError(f"{name} in {self.label} is not valid JSON") from None

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read(MAX_JSON + 1)

    def close(self) -> None:
        pass


def _clean(name: str) -> str | None:
    """A relative path inside the source, or None if it would leave it."""
    if name.startswith("/"):
        return None
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        return None
    return normal


class _DirFiles(_Files):
    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.root = root

    def _path(self, name: str) -> Path:
        clean = _clean(name)
        if clean is None:
            raise ArchiveError(f"{self.label} refers to {name}, outside the layout; refusing it")
        return self.root / clean

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int | None:
        return self._path(name).stat().st_size

    @contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        path = self._path(name)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below, after the yield
        except FileNotFoundError:
            raise ArchiveError(f"{self.label} has no {name}") from None
        with handle:
            yield handle

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return self._open(name)


class _TarFiles(_Files):
    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            members = self.tar.getmembers()
        except (tarfile.TarError, EOFError, OSError):
            raise ArchiveError(
                f"{path} is not an image: not a tar archive (oci-archive or docker save) "
                "and not an OCI layout directory"
            ) from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            clean = _clean(member.name)
            if clean is not None and (member.isfile() or member.islnk() or member.issym()):
                self.members[clean] = member

    def exists(self, name: str) -> bool:
        clean = _clean(name)
        return clean is not None and clean in self.members

    def size(self, name: str) -> int | None:
        clean = _clean(name)
        member = self.members.get(clean) if clean is not None else None
        return member.size if member is not None and member.isfile() else None

    @contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        clean = _clean(name)
        member = self.members.get(clean) if clean is not None else None
        if member is None:
            raise ArchiveError(f"{self.label} has no {name}")
        try:
            handle = self.tar.extractfile(member)
        except (tarfile.TarError, KeyError):
            handle = None
        if handle is None:
            raise ArchiveError(f"{name} in {self.label} is not a file")
        with handle:
            yield handle

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return self._open(name)

    def close(self) -> None:
        self.tar.close()


# ---------------------------------------------------------------- formats


def _blob_path(digest: str, label: str) -> str:
    hex_part = sha256_hex_of(digest)
    if hex_part is None:
        raise ArchiveError(f"{label} refers to {digest!r}, which is not a sha256 digest")
    return f"blobs/sha256/{hex_part}"


def _descriptor_blob(files: _Files, descriptor: Any, what: str) -> SourceBlob:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise ArchiveError(f"the {what} descriptor in {files.label} has no digest")
    digest = descriptor["digest"]
    path = _blob_path(digest, files.label)
    size = descriptor.get("size")
    return SourceBlob(
        open=lambda: files.open(path),
        digest=digest,
        size=size if isinstance(size, int) else None,
        media_type=str(descriptor.get("mediaType", "")),
    )


def _verified_json(files: _Files, digest: str, what: str) -> tuple[bytes, Any]:
    path = _blob_path(digest, files.label)
    if not files.exists(path):
        raise ArchiveError(f"{files.label} is missing the {what} blob {digest}")
    data = files.read_bytes(path)
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ArchiveError(f"the {what} {digest} in {files.label} does not match its digest")
    try:
        return data, json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ArchiveError(f"the {what} {digest} in {files.label} is not valid JSON") from None


def _platform_matches(descriptor: dict[str, Any]) -> bool:
    wanted_os, wanted_arch = host_platform()
    found = descriptor.get("platform")
    if not isinstance(found, dict):
        return True
    return found.get("os") == wanted_os and found.get("architecture") == wanted_arch


def _oci_images(files: _Files) -> list[SourceImage]:
    index = files.read_json("index.json")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ArchiveError(f"index.json in {files.label} has no manifests list")
    images: list[SourceImage] = []
    pending: list[tuple[dict[str, Any], dict[str, str]]] = [
        (d, dict(d.get("annotations") or {})) for d in index["manifests"] if isinstance(d, dict)
    ]
    skipped_platforms = 0
    while pending:
        descriptor, annotations = pending.pop(0)
        if not _platform_matches(descriptor):
            skipped_platforms += 1
            continue
        media_type = descriptor.get("mediaType", "")
        digest = descriptor.get("digest")
        if not isinstance(digest, str):
            raise ArchiveError(f"index.json in {files.label} has a manifest without a digest")
        data, document = _verified_json(files, digest, "manifest")
        if media_type in INDEX_TYPES or (
            isinstance(document, dict) and isinstance(document.get("manifests"), list)
        ):
            # A nested (multi-platform) index: its entries inherit the names.
            pending.extend(
                (d, {**annotations, **(d.get("annotations") or {})})
                for d in document["manifests"]
                if isinstance(d, dict)
            )
            continue
        if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
            raise ArchiveError(f"the manifest {digest} in {files.label} has no layers list")
        images.append(
            SourceImage(
                names=_oci_names(annotations),
                config=_descriptor_blob(files, document.get("config"), "config"),
                layers=[_descriptor_blob(files, d, "layer") for d in document["layers"]],
                manifest=data,
                manifest_digest=digest,
                annotations=annotations,
            )
        )
    if not images and skipped_platforms:
        os_name, arch = host_platform()
        raise ArchiveError(f"{files.label} has no image for this node's platform {os_name}/{arch}")
    return images


def _oci_names(annotations: dict[str, str]) -> list[str]:
    full = annotations.get("io.containerd.image.name")
    if full:
        return [full]
    ref_name = annotations.get("org.opencontainers.image.ref.name", "")
    # The OCI annotation is often only a tag ("latest"): a name needs a '/'.
    if "/" in ref_name:
        return [ref_name]
    return []


def _docker_images(files: _Files) -> list[SourceImage]:
    manifest = files.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ArchiveError(f"manifest.json in {files.label} lists no images")
    images: list[SourceImage] = []
    for entry in manifest:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise ArchiveError(f"manifest.json in {files.label} has an entry without Config")
        layers = entry.get("Layers") or []
        if not isinstance(layers, list) or not all(isinstance(p, str) for p in layers):
            raise ArchiveError(f"manifest.json in {files.label} has a malformed Layers list")
        images.append(
            SourceImage(
                names=[t for t in entry.get("RepoTags") or [] if isinstance(t, str)],
                config=_docker_blob(files, entry["Config"]),
                layers=[_docker_blob(files, p) for p in layers],
            )
        )
    return images


def _docker_blob(files: _Files, path: str) -> SourceBlob:
    if not files.exists(path):
        raise ArchiveError(f"{files.label} is missing {path}, which manifest.json lists")
    # Newer `docker save` names blobs by digest (blobs/sha256/<hex>); classic
    # configs are <hex>.json. Classic layer.tar names say nothing: their
    # digest is known only after hashing, and checked against the diff ids.
    base = posixpath.basename(path).removesuffix(".json")
    digest = f"sha256:{base}" if sha256_hex_of(f"sha256:{base}") else None
    return SourceBlob(open=lambda: files.open(path), digest=digest, size=files.size(path))


class Source:
    """An opened local image source."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kind: str
        if not path.is_absolute():
            raise InvalidArgumentError(f"{path} is not an absolute path")
        if path.is_dir():
            self.files: _Files = _DirFiles(path)
        elif path.is_file():
            self.files = _TarFiles(path)
        elif path.exists():
            raise ArchiveError(f"{path} is neither a file nor a directory")
        else:
            raise NotFoundError(f"{path} does not exist")
        if self.files.exists("manifest.json"):
            self.kind = "docker-archive" if isinstance(self.files, _TarFiles) else "docker-dir"
        elif self.files.exists("oci-layout"):
            self.kind = "oci-archive" if isinstance(self.files, _TarFiles) else "oci"
        else:
            self.files.close()
            raise ArchiveError(
                f"{path} is not an image: it has neither an oci-layout file (OCI layout or "
                "oci-archive) nor a manifest.json (docker save)"
            )

    def images(self) -> list[SourceImage]:
        if self.kind.startswith("docker"):
            return _docker_images(self.files)
        return _oci_images(self.files)

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
