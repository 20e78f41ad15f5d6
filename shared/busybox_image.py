"""Builds the busybox test image from Debian's busybox-static, without any image tool.

The image is the smallest useful Linux userland: ``/bin/busybox`` with
*relative* links to its applets (``bin/sh -> busybox``), ``/etc/passwd`` and
``/etc/group`` with root and nobody, and ``CMD ["sh"]``. It is written as an
OCI layout directory, an oci-archive and a ``docker save`` tar, byte for byte
the same on every run, so tests and ``scripts/setup.sh`` share one recipe::

    python -m shared.busybox_image OUT_DIR [--name zlayer/busybox:latest]

The writers take any list of layer tars, so tests build other images
(shared layers, broken digests) with the same code.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import platform
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BUSYBOX = Path("/bin/busybox")
DEFAULT_NAME = "docker.io/zlayer/busybox:latest"
CREATED = "2024-01-01T00:00:00Z"
EPOCH = 1704067200  # CREATED as a Unix time: every file gets it, for reproducible bytes
APPLETS = (
    "sh", "ash", "httpd", "nc", "echo", "cat", "sleep", "true", "false", "ls", "wget", "env",
    "id", "hostname", "ps", "mkdir", "rm", "cp", "mv", "touch", "grep", "sed", "head", "tail",
    "wc", "test", "[", "kill", "date", "uname", "pwd", "printf", "stat", "ln", "chmod", "chown",
    "find", "mount", "umount", "ip", "ping", "vi", "tee", "sort", "tr", "xargs", "du", "df",
    "whoami", "top", "nslookup", "seq", "yes", "dd", "expr", "basename", "dirname",
)  # fmt: skip
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnobody:x:65534:\n"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"

Compression = Literal["none", "gzip", "zstd"]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


# ---------------------------------------------------------------- tars


@dataclass
class Entry:
    """One member of a layer tar."""

    name: str
    kind: Literal["dir", "file", "symlink", "hardlink", "char", "block", "fifo"] = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""  # link target
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


_KINDS = {
    "dir": tarfile.DIRTYPE,
    "file": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(entries: Iterable[Entry]) -> bytes:
    """An uncompressed tar of ``entries``, in the given order, reproducible."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = _KINDS[entry.kind]
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.uname = info.gname = ""
            info.mtime = EPOCH
            info.linkname = entry.target
            info.devmajor, info.devminor = entry.devmajor, entry.devminor
            if entry.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in entry.xattrs.items()}
            if entry.kind == "file":
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def busybox_entries(busybox: Path = BUSYBOX) -> list[Entry]:
    """The busybox root file system as layer tar entries."""
    if not busybox.is_file():
        raise FileNotFoundError(
            f"{busybox} is missing; install Debian's busybox-static "
            "(apt-get install busybox-static)"
        )
    entries = [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/busybox", "file", busybox.read_bytes(), mode=0o755),
        *(Entry(f"bin/{name}", "symlink", target="busybox", mode=0o777) for name in APPLETS),
        Entry("dev", "dir", mode=0o755),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/group", "file", GROUP.encode()),
        Entry("etc/passwd", "file", PASSWD.encode()),
        Entry("proc", "dir", mode=0o555),
        Entry("root", "dir", mode=0o700),
        Entry("sys", "dir", mode=0o555),
        Entry("tmp", "dir", mode=0o1777),
        Entry("usr", "dir", mode=0o755),
        Entry("usr/bin", "dir", mode=0o755),
        Entry("usr/sbin", "dir", mode=0o755),
        Entry("var", "dir", mode=0o755),
        Entry("var/www", "dir", mode=0o755),
    ]
    return entries


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


# ---------------------------------------------------------------- images


@dataclass
class Image:
    """An image in memory: uncompressed layer tars and its config."""

    layers: list[bytes]
    config: dict[str, Any]
    name: str = DEFAULT_NAME

    @property
    def config_bytes(self) -> bytes:
        return _json_bytes(self.config)

    @property
    def config_digest(self) -> str:
        return _sha256(self.config_bytes)


def make_image(
    layers: list[bytes],
    name: str = DEFAULT_NAME,
    cmd: list[str] | None = None,
    **config: Any,
) -> Image:
    """An image of ``layers`` (base first) with a config like ``docker build`` writes."""
    container_config: dict[str, Any] = {"Env": [PATH_ENV], "Cmd": cmd or ["sh"]}
    container_config.update(config)
    document = {
        "architecture": _arch(),
        "os": "linux",
        "created": CREATED,
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [_sha256(layer) for layer in layers]},
        "history": [
            {"created": CREATED, "created_by": f"shared.busybox_image layer {i}"}
            for i in range(len(layers))
        ],
    }
    return Image(layers=layers, config=document, name=name)


def busybox_image(name: str = DEFAULT_NAME, busybox: Path = BUSYBOX) -> Image:
    return make_image(
        [make_tar(busybox_entries(busybox))],
        name,
        cmd=["sh"],
        Labels={"org.opencontainers.image.title": "zlayer busybox test image"},
    )


def _oci_blobs(image: Image, compression: Compression) -> tuple[bytes, dict[str, bytes]]:
    """(manifest bytes, every blob by digest) of ``image`` in OCI form."""
    blobs: dict[str, bytes] = {image.config_digest: image.config_bytes}
    descriptors = []
    suffix = {"none": "", "gzip": "+gzip", "zstd": "+zstd"}[compression]
    for layer in image.layers:
        data = compress(layer, compression)
        digest = _sha256(data)
        blobs[digest] = data
        descriptors.append({"mediaType": MEDIA_LAYER + suffix, "digest": digest, "size": len(data)})
    manifest = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {
                "mediaType": MEDIA_CONFIG,
                "digest": image.config_digest,
                "size": len(image.config_bytes),
            },
            "layers": descriptors,
        }
    )
    blobs[_sha256(manifest)] = manifest
    return manifest, blobs


def _oci_layout_files(image: Image, compression: Compression) -> dict[str, bytes]:
    manifest, blobs = _oci_blobs(image, compression)
    tag = image.name.rpartition(":")[2] if ":" in image.name.rpartition("/")[2] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": _sha256(manifest),
                "size": len(manifest),
                "annotations": {
                    "io.containerd.image.name": image.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    files = {
        "oci-layout": _json_bytes({"imageLayoutVersion": "1.0.0"}),
        "index.json": _json_bytes(index),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.removeprefix("sha256:")] = data
    return files


def _write_tree(files: dict[str, bytes], out_dir: Path) -> None:
    for relative, data in files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _tar_of(files: dict[str, bytes]) -> bytes:
    """A tar of ``files`` with their parent directories, sorted, reproducible."""
    entries: list[Entry] = []
    dirs: set[str] = set()
    for relative in sorted(files):
        parts = relative.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in dirs:
                dirs.add(parent)
                entries.append(Entry(parent, "dir", mode=0o755))
        entries.append(Entry(relative, "file", files[relative]))
    return make_tar(entries)


def write_oci_layout(image: Image, out_dir: Path, compression: Compression = "gzip") -> Path:
    """An OCI image layout directory (what ``skopeo copy ... oci:DIR`` writes)."""
    _write_tree(_oci_layout_files(image, compression), out_dir)
    return out_dir


def write_oci_archive(image: Image, out_path: Path, compression: Compression = "gzip") -> Path:
    """An oci-archive: the OCI layout inside a tar."""
    out_path.write_bytes(_tar_of(_oci_layout_files(image, compression)))
    return out_path


def docker_archive_files(
    image: Image, layout: Literal["classic", "blobs"] = "classic"
) -> dict[str, bytes]:
    """The members of a ``docker save`` tar.

    ``classic``: ``<id>.json`` and ``<layer>/layer.tar`` (Docker before 25);
    ``blobs``: everything under ``blobs/sha256`` beside an OCI index (Docker 25+).
    """
    repo_tag = image.name.removeprefix("docker.io/").removeprefix("library/")
    files: dict[str, bytes] = {}
    layer_paths = []
    if layout == "classic":
        config_path = image.config_digest.removeprefix("sha256:") + ".json"
        parent = ""
        for layer in image.layers:
            layer_id = hashlib.sha256((parent + _sha256(layer)).encode()).hexdigest()
            files[f"{layer_id}/layer.tar"] = layer
            files[f"{layer_id}/VERSION"] = b"1.0"
            files[f"{layer_id}/json"] = _json_bytes({"id": layer_id, "parent": parent})
            layer_paths.append(f"{layer_id}/layer.tar")
            parent = layer_id
    else:
        files = _oci_layout_files(image, "none")
        config_path = "blobs/sha256/" + image.config_digest.removeprefix("sha256:")
        layer_paths = ["blobs/sha256/" + _sha256(layer)[7:] for layer in image.layers]
    files[config_path] = image.config_bytes
    files["manifest.json"] = _json_bytes(
        [{"Config": config_path, "RepoTags": [repo_tag], "Layers": layer_paths}]
    )
    return files


def write_docker_archive(
    image: Image, out_path: Path, layout: Literal["classic", "blobs"] = "classic"
) -> Path:
    out_path.write_bytes(_tar_of(docker_archive_files(image, layout)))
    return out_path


def write_all(image: Image, out_dir: Path) -> dict[str, Path]:
    """The image in the three formats registryd imports, under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "oci": write_oci_layout(image, out_dir / "oci"),
        "oci-archive": write_oci_archive(image, out_dir / "oci-archive.tar"),
        "docker-archive": write_docker_archive(image, out_dir / "docker-archive.tar"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.busybox_image",
        description="Write the busybox test image as oci/, oci-archive.tar and "
        "docker-archive.tar under OUT_DIR.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--name", default=DEFAULT_NAME, help="the name recorded in the archives")
    parser.add_argument("--busybox", type=Path, default=BUSYBOX, help="a static busybox binary")
    args = parser.parse_args(argv)
    try:
        written = write_all(busybox_image(args.name, args.busybox), args.out_dir)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind, path in written.items():
        print(f"{kind}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
