"""The image store of zlayer-registryd: blobs by digest, unpacked layers, and the image index.

Layout under the daemon's state directory::

    blobs/sha256/<hex>     every manifest, config and layer blob, stored once
    layers/<diff-id hex>   each layer unpacked once, usable as an overlayfs lower dir
    index.json             image id -> manifest, layers, names (written by tmp + rename)
    tmp/                   work in progress; emptied on start
    partial/<hex>          registry downloads in progress, kept across restarts so a
                           pull resumes; linked into blobs/ only once their digest
                           matched, removed when the pull commits

Nothing becomes visible before it is complete: a blob is hashed into
``tmp/`` and renamed into place only when its digest matches, a layer is
unpacked into ``tmp/`` and renamed when its diff id matches, the index is
replaced atomically, and a layer being deleted is first renamed out of
``layers/``. Blobs and layers no image references are deleted on start
(what a killed import left), after a failed import, and on image removal.

Every method blocks (hashing, untar): the daemon calls them in a thread.
Concurrent imports coordinate through per-digest locks, and *pins* keep
what an import is using safe from a concurrent removal's clean-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

import msgspec

from daemons.registryd.sources import (
    ArchiveError,
    Opener,
    Source,
    SourceBlob,
    SourceImage,
    sha256_hex_of,
)
from daemons.registryd.unpack import (
    DEFAULT_MAX_UNPACKED,
    GZIP_MAGIC,
    ZSTD_MAGIC,
    unpack_layer,
)
from daemons.registryd.wasm import image_runtime, is_wasm_blob, unpack_wasm_layer
from shared.bus import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from shared.libc import syncfs
from shared.reference import InvalidReferenceError, parse_reference
from shared.statefile import read_state, write_atomically
from shared.wire import decode
from shared.wire.registry import ImageConfig, ImageDetail, ImageInfo, ImageRootfs

log = logging.getLogger("zlayer.registryd.store")

CHUNK = 1 << 20
MAX_CONFIG = 16 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_ID_PREFIX_RE = re.compile(r"[0-9a-f]{4,64}")


class StoreError(Exception):
    """The store on disk is unusable (an unreadable index); the daemon cannot start."""


class ImageRecord(msgspec.Struct, kw_only=True):
    """One image in the index (unknown keys in the file are ignored)."""

    id: str
    manifest_digest: str
    names: list[str] = msgspec.field(default_factory=list)
    layers: list[str]
    diff_ids: list[str]
    size: int
    created: str = ""
    architecture: str = ""
    os: str = ""
    is_wasm: bool = False
    runtime: Literal["oci", "wasm"] = "oci"
    imported_at: float = 0.0

    def info(self) -> ImageInfo:
        return ImageInfo(
            id=self.id,
            manifest_digest=self.manifest_digest,
            names=list(self.names),
            layers=list(self.layers),
            size=self.size,
            created=self.created,
            architecture=self.architecture,
            os=self.os,
            is_wasm=self.is_wasm,
            runtime=self.runtime,
        )


class IndexFile(msgspec.Struct, kw_only=True):
    version: int = 1
    images: dict[str, ImageRecord] = msgspec.field(default_factory=dict)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    hex_part = sha256_hex_of(digest)
    if hex_part is None:
        raise ArchiveError(f"{digest!r} is not a sha256 digest")
    return hex_part


def _opener(path: Path) -> Opener:
    return lambda: open(path, "rb")


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


def image_config(document: dict[str, Any]) -> ImageConfig:
    """The parts of an OCI/Docker image config document that shape a container."""
    config = document.get("config") or {}
    if not isinstance(config, dict):
        config = {}
    ports = config.get("ExposedPorts") or {}
    labels = config.get("Labels") or {}
    return ImageConfig(
        entrypoint=_string_list(config.get("Entrypoint")),
        cmd=_string_list(config.get("Cmd")),
        env=_string_list(config.get("Env")),
        workdir=str(config.get("WorkingDir") or ""),
        user=str(config.get("User") or ""),
        exposed_ports=sorted(p if "/" in p else f"{p}/tcp" for p in map(str, ports)),
        stop_signal=str(config.get("StopSignal") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
    )


class ImageStore:
    """Blobs, unpacked layers and the image index under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.layer_dir = root / "layers"
        self.tmp_dir = root / "tmp"
        self.partial_dir = root / "partial"
        self.index_path = root / "index.json"
        self.images: dict[str, ImageRecord] = {}
        self._lock = threading.RLock()  # the index, the pins and the key locks
        self._key_locks: dict[str, threading.Lock] = {}
        self._pins: Counter[str] = Counter()
        self.max_unpacked = DEFAULT_MAX_UNPACKED  # bytes a layer may unpack to (the settings')
        # Told of each image stored or newly named, from the storing thread (must not block).
        self.on_stored: Callable[[ImageInfo], None] | None = None

    # ------------------------------------------------------------ start

    def open(self) -> None:
        """Load the index and drop whatever an interrupted run left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        # Layers hold set-user-ID files owned by root: other users must not
        # reach them (overlayfs looks lower dirs up as the mounter, root).
        os.chmod(self.root, 0o700)
        for directory in (self.blob_dir, self.layer_dir, self.partial_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir()
        for stale in self.root.glob(".index.json.*"):  # an older writer's temporary files
            stale.unlink(missing_ok=True)
        self.images = self._load_index()
        with self._lock:
            removed = self._collect_garbage()
        if removed:
            log.info("removed %d blobs no image references (an interrupted run)", len(removed))

    def _load_index(self) -> dict[str, ImageRecord]:
        index = read_state(
            self.index_path,
            lambda text: decode(text, IndexFile),
            "taking the images back from the manifests in the store (their names are lost: "
            "pull or import them again to name them)",
            log,
        )
        if index is not None:
            return index.images
        # No index (or an unusable one, moved aside): never start empty over a
        # full store, whose clean-up would delete every blob and layer (some
        # mounted by running replicas). Every complete image is taken back.
        images = self._rebuild_index()
        if images:
            self.images = images
            self._save_index()
            log.warning("took back %d images from the blobs in %s", len(images), self.blob_dir)
        return images

    def _rebuild_index(self) -> dict[str, ImageRecord]:
        """The images whose manifest, config, layer blobs and unpacked layers are all here."""
        images: dict[str, ImageRecord] = {}
        for entry in sorted(os.scandir(self.blob_dir), key=lambda e: e.name):
            try:
                if entry.stat().st_size > MAX_CONFIG:
                    continue
                with open(entry.path, "rb") as handle:
                    if handle.read(1) != b"{":
                        continue
                    manifest = json.loads(b"{" + handle.read())
                record = self._record_of_manifest(f"sha256:{entry.name}", manifest)
            except (OSError, ValueError, TypeError, KeyError, ArchiveError):
                continue
            if record is not None and record.id not in images and self._complete(record):
                images[record.id] = record
        return images

    def _record_of_manifest(self, digest: str, manifest: Any) -> ImageRecord | None:
        if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
            return None
        config, layers = manifest.get("config"), manifest.get("layers")
        if not isinstance(config, dict) or not isinstance(layers, list):
            return None
        config_path = self.blob_path(str(config["digest"]))
        document = json.loads(config_path.read_bytes())
        if not isinstance(document, dict):
            return None
        blobs = [
            SourceBlob(
                open=_opener(self.blob_path(str(layer["digest"]))),
                digest=str(layer["digest"]),
                size=int(layer.get("size", 0)),
                media_type=str(layer.get("mediaType", "")),
            )
            for layer in layers
        ]
        config_blob = SourceBlob(
            open=_opener(config_path),
            digest=str(config["digest"]),
            media_type=str(config.get("mediaType", "")),
        )
        image = SourceImage([], config_blob, blobs, json.dumps(manifest).encode(), digest)
        runtime, wasm_diff_ids = image_runtime(image, document, str(self.blob_dir))
        rootfs = document.get("rootfs") or {}
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if wasm_diff_ids is not None:
            diff_ids = wasm_diff_ids
        if not isinstance(diff_ids, list) or len(diff_ids) != len(blobs):
            return None
        return ImageRecord(
            id=str(config["digest"]),
            manifest_digest=digest,
            layers=[str(b.digest) for b in blobs],
            diff_ids=[str(d) for d in diff_ids],
            size=sum(b.size or 0 for b in blobs),
            created=str(document.get("created") or ""),
            architecture=str(document.get("architecture") or ""),
            os=str(document.get("os") or ""),
            is_wasm=runtime == "wasm",
            runtime=runtime,
            imported_at=time.time(),
        )

    def _save_index(self) -> None:
        text = msgspec.json.format(msgspec.json.encode(IndexFile(images=self.images)), indent=1)
        write_atomically(self.index_path, text)

    # ------------------------------------------------------------ locks and pins

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _pin(self, pinned: list[str], *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._pins[key] += 1
                pinned.append(key)

    def _unpin(self, pinned: list[str]) -> None:
        with self._lock:
            for key in pinned:
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]
            pinned.clear()

    # ------------------------------------------------------------ paths

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / _hex(digest)

    def layer_path(self, diff_id: str) -> Path:
        return self.layer_dir / _hex(diff_id)

    def _complete(self, record: ImageRecord) -> bool:
        blobs = [record.id, record.manifest_digest, *record.layers]
        return all(self.blob_path(d).is_file() for d in blobs) and all(
            self.layer_path(d).is_dir() for d in record.diff_ids
        )

    # ------------------------------------------------------------ lookups

    def list_images(self) -> list[ImageInfo]:
        with self._lock:
            records = sorted(self.images.values(), key=lambda r: (r.names[:1], r.id))
            return [r.info() for r in records]

    def find(self, reference: str) -> tuple[ImageRecord, bool] | None:
        """The image ``reference`` means (a name, a digest reference, an id or id prefix).

        The flag says whether it was found by name rather than by id.
        """
        text = reference.strip()
        if not text:
            raise InvalidArgumentError("give an image name or id")
        bare = text.removeprefix("sha256:")
        looks_like_id = _ID_PREFIX_RE.fullmatch(bare) is not None
        with self._lock:
            if text.startswith("sha256:"):
                by_id = self._by_id_prefix(bare, text) if looks_like_id else None
                return (by_id, False) if by_id is not None else None
            try:
                parsed = parse_reference(text)
            except InvalidReferenceError as exc:
                if not looks_like_id:
                    raise InvalidArgumentError(str(exc)) from None
            else:
                # A name wins over an id prefix that happens to read the same (as in Docker).
                for record in self.images.values():
                    if parsed.digest is None and str(parsed) in record.names:
                        return record, True
                    if parsed.digest in (record.manifest_digest, record.id) and any(
                        parse_reference(n).repository == parsed.repository for n in record.names
                    ):
                        return record, False
            if looks_like_id:
                by_id = self._by_id_prefix(bare, text)
                if by_id is not None:
                    return by_id, False
        return None

    def _by_id_prefix(self, prefix: str, text: str) -> ImageRecord | None:
        matches = [r for r in self.images.values() if _hex(r.id).startswith(prefix)]
        if len(matches) > 1:
            raise InvalidArgumentError(f"{text} matches {len(matches)} images; give more of the id")
        return matches[0] if matches else None

    def resolve(self, reference: str) -> tuple[ImageRecord, bool]:
        found = self.find(reference)
        if found is None:
            raise NotFoundError(
                f"image {self._display(reference)} is not on this node; "
                "`zlayerctl image ls` lists the images here"
            )
        return found

    @staticmethod
    def _display(reference: str) -> str:
        try:
            return str(parse_reference(reference.strip()))
        except InvalidReferenceError:
            return reference

    def read_config(self, record: ImageRecord) -> dict[str, Any]:
        try:
            with open(self.blob_path(record.id), "rb") as handle:
                document = json.loads(handle.read(MAX_CONFIG))
        except (OSError, ValueError):
            raise UnavailableError(
                f"the config of image {record.id} is missing from the store; import the image again"
            ) from None
        return document if isinstance(document, dict) else {}

    def detail(self, reference: str) -> ImageDetail:
        record, _ = self.resolve(reference)
        document = self.read_config(record)
        history = document.get("history") or []
        return ImageDetail(
            image=record.info(),
            config=image_config(document),
            history=[h for h in history if isinstance(h, dict)],
        )

    def stats(self) -> tuple[int, int, int]:
        """(images, bytes of blobs, unpacked layers), for the metrics."""
        with self._lock:
            images = len(self.images)
        size = 0
        with os.scandir(self.blob_dir) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    size += entry.stat().st_size
        layers = sum(1 for _ in os.scandir(self.layer_dir))
        return images, size, layers

    # ------------------------------------------------------------ import

    def import_path(self, path: str, name: str = "") -> list[ImageInfo]:
        """Import every image in the source at ``path``; ``name`` is added to a single image."""
        extra: str | None = None
        if name:
            try:
                extra = str(parse_reference(name))
            except InvalidReferenceError as exc:
                raise InvalidArgumentError(str(exc)) from None
        with Source(Path(path)) as source:
            images = source.images()
            if not images:
                raise ArchiveError(f"{path} holds no images")
            if extra and len(images) > 1:
                raise InvalidArgumentError(
                    f"{path} holds {len(images)} images; a name can be given only for one"
                )
            return [self._import_one(image, extra, path) for image in images]

    def _import_one(self, image: SourceImage, extra: str | None, path: str) -> ImageInfo:
        pinned: list[str] = []
        try:
            info = self._import_pinned(image, extra, path, pinned)
        except BaseException:
            self._unpin(pinned)
            with self._lock:
                self._collect_garbage()
            raise
        self._unpin(pinned)
        return info

    def _import_pinned(
        self, image: SourceImage, extra: str | None, path: str, pinned: list[str]
    ) -> ImageInfo:
        config_bytes = self._read_config(image.config, path)
        image_id = _digest(config_bytes)
        try:
            document = json.loads(config_bytes)
        except (ValueError, UnicodeDecodeError):
            raise ArchiveError(f"the image config {image_id} in {path} is not valid JSON") from None
        if not isinstance(document, dict):
            raise ArchiveError(f"the image config {image_id} in {path} is not a JSON object")
        rootfs = document.get("rootfs") or {}
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        # A WASM artifact's config has no rootfs: its raw layers are their own diff ids.
        runtime, wasm_diff_ids = image_runtime(image, document, path)
        if wasm_diff_ids is not None:
            diff_ids = wasm_diff_ids
        if not isinstance(diff_ids, list) or len(diff_ids) != len(image.layers):
            raise ArchiveError(
                f"the image config {image_id} in {path} lists {len(diff_ids or [])} layer "
                f"diff ids for {len(image.layers)} layers"
            )
        for diff_id in diff_ids:
            _hex(str(diff_id))
        names = self._names(image.names, extra)
        self._pin(pinned, image_id, *diff_ids)

        with self._lock:
            existing = self.images.get(image_id)
        if existing is not None and self._complete(existing):
            # The same image again: its blobs and layers are here already.
            log.info("image %s is already stored; adding names %s", image_id, names)
            return self._commit(existing, names)

        self._write_blob_bytes(config_bytes, pinned)
        layers: list[tuple[str, int]] = []
        for number, blob in enumerate(image.layers, start=1):
            layers.append(self._store_blob(blob, f"layer {number}", path, pinned))
        if image.manifest is not None and image.manifest_digest is not None:
            manifest, manifest_digest = image.manifest, image.manifest_digest
        else:
            manifest = self._make_manifest(image_id, len(config_bytes), layers)
            manifest_digest = _digest(manifest)
        self._pin(pinned, manifest_digest)
        self._write_blob_bytes(manifest, pinned)
        self._ensure_layers(
            [
                (digest, str(diff_id))
                for (digest, _size), diff_id in zip(layers, diff_ids, strict=True)
            ]
        )

        architecture = str(document.get("architecture") or "")
        os_name = str(document.get("os") or "")
        record = ImageRecord(
            id=image_id,
            manifest_digest=manifest_digest,
            names=[],
            layers=[digest for digest, _ in layers],
            diff_ids=[str(d) for d in diff_ids],
            size=sum(size for _, size in layers),
            created=str(document.get("created") or ""),
            architecture=architecture,
            os=os_name,
            is_wasm=runtime == "wasm",
            runtime=runtime,
            imported_at=time.time(),
        )
        if existing is not None:
            record = msgspec.structs.replace(record, names=existing.names)
        return self._commit(record, names)

    def _names(self, found: list[str], extra: str | None) -> list[str]:
        names: list[str] = []
        for raw in found:
            try:
                names.append(str(parse_reference(raw)))
            except InvalidReferenceError as exc:
                log.warning("ignoring the name %r the archive gives: %s", raw, exc)
        if extra is not None:
            names.append(extra)
        return list(dict.fromkeys(names))

    def _commit(self, record: ImageRecord, names: list[str]) -> ImageInfo:
        """Store ``record`` in the index with ``names`` added; a name moves off any other image."""
        with self._lock:
            current = self.images.get(record.id, record)
            merged = list(dict.fromkeys([*current.names, *names]))
            for other in list(self.images.values()):
                if other.id != record.id and set(other.names) & set(names):
                    kept = [n for n in other.names if n not in names]
                    self.images[other.id] = msgspec.structs.replace(other, names=kept)
            stored = msgspec.structs.replace(record, names=merged)
            self.images[record.id] = stored
            self._save_index()
            info = stored.info()
        if self.on_stored is not None:
            self.on_stored(info)
        return info

    def _read_config(self, blob: SourceBlob, path: str) -> bytes:
        with blob.open() as handle:
            data = handle.read(MAX_CONFIG + 1)
        if len(data) > MAX_CONFIG:
            raise ArchiveError(f"the image config in {path} is too large to be one")
        if blob.digest is not None and _digest(data) != blob.digest:
            raise ArchiveError(
                f"the image config {blob.digest} in {path} does not match its digest; "
                "the archive is corrupt"
            )
        return data

    def _make_manifest(
        self, config_digest: str, config_size: int, layers: list[tuple[str, int]]
    ) -> bytes:
        """An OCI manifest for a ``docker save`` image, which has none of its own."""
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                "layers": [
                    {"mediaType": self._layer_media_type(digest), "digest": digest, "size": size}
                    for digest, size in layers
                ],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    def _layer_media_type(self, digest: str) -> str:
        with open(self.blob_path(digest), "rb") as handle:
            head = handle.read(4)
        if head.startswith(GZIP_MAGIC):
            return OCI_LAYER + "+gzip"
        if head.startswith(ZSTD_MAGIC):
            return OCI_LAYER + "+zstd"
        return OCI_LAYER

    def _write_blob_bytes(self, data: bytes, pinned: list[str]) -> None:
        digest = _digest(data)
        self._pin(pinned, digest)
        final = self.blob_path(digest)
        if final.is_file():
            return
        tmp = self.tmp_dir / f"blob-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        with self._key_lock(digest):
            if final.is_file():
                tmp.unlink()
            else:
                os.rename(tmp, final)

    def _store_blob(
        self, blob: SourceBlob, what: str, path: str, pinned: list[str]
    ) -> tuple[str, int]:
        """Copy ``blob`` into the store, checking its digest; (digest, size)."""
        if blob.digest is not None:
            self._pin(pinned, blob.digest)
            final = self.blob_path(blob.digest)
            if final.is_file():
                return blob.digest, final.stat().st_size
        tmp = self.tmp_dir / f"blob-{uuid.uuid4().hex}"
        hasher = hashlib.sha256()
        size = 0
        try:
            with blob.open() as source, open(tmp, "wb") as out:
                while chunk := source.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + hasher.hexdigest()
            if blob.digest is not None and digest != blob.digest:
                raise ArchiveError(
                    f"{what} of the image in {path} should be {blob.digest} but its content is "
                    f"{digest}; the archive is corrupt"
                )
            if blob.size is not None and size != blob.size:
                raise ArchiveError(
                    f"{what} of the image in {path} should be {blob.size} bytes but is {size}; "
                    "the archive is corrupt"
                )
            self._pin(pinned, digest)
            final = self.blob_path(digest)
            with self._key_lock(digest):
                if final.is_file():
                    tmp.unlink()
                else:
                    os.rename(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return digest, size

    def _ensure_layers(self, layers: list[tuple[str, str]]) -> list[Path]:
        """The unpacked directories of (blob digest, diff id) pairs, in order.

        Missing layers are unpacked into work directories first, then made
        durable with one sync for all of them, then renamed into place: the
        rename is what makes a layer trusted, so its files must be on disk
        before it, or a crash could expose a hollow layer. One sync for the
        image instead of one per layer: a sync flushes the whole machine.
        """
        keys = sorted({"layer:" + diff_id for _, diff_id in layers})
        with contextlib.ExitStack() as stack:
            for key in keys:  # always in the same order: no deadlock between pulls
                stack.enter_context(self._key_lock(key))
            pending: dict[Path, Path] = {}  # final -> work
            try:
                for digest, diff_id in layers:
                    final = self.layer_path(diff_id)
                    if final.is_dir() or final in pending:
                        continue
                    blob = self.blob_path(digest)
                    if not blob.is_file():
                        raise UnavailableError(
                            f"the blob of layer {digest} is missing from the store; "
                            "import the image again"
                        )
                    work = self.tmp_dir / f"unpack-{uuid.uuid4().hex}"
                    pending[final] = work
                    started = time.monotonic()
                    if is_wasm_blob(blob):
                        unpack_wasm_layer(blob, work)
                    else:
                        unpack_layer(blob, work, digest, diff_id, self.max_unpacked)
                    log.info("unpacked layer %s in %.2fs", diff_id, time.monotonic() - started)
                if pending:
                    self.sync()
                    for final, work in pending.items():
                        os.rename(work, final)
            finally:
                for work in pending.values():
                    if work.exists():
                        shutil.rmtree(work, ignore_errors=True)
        return [self.layer_path(diff_id) for _, diff_id in layers]

    # ------------------------------------------------------------ ensure

    def rootfs(self, reference: str) -> ImageRootfs | None:
        """The image's unpacked layers, topmost first; None if it is not here."""
        found = self.find(reference)
        if found is None:
            return None
        record = found[0]
        pinned: list[str] = []
        try:
            self._pin(pinned, *record.layers, *record.diff_ids)
            lower = [
                str(path)
                for path in self._ensure_layers(
                    list(zip(record.layers, record.diff_ids, strict=True))
                )
            ]
        finally:
            self._unpin(pinned)
        return ImageRootfs(
            image=record.info(),
            config=image_config(self.read_config(record)),
            lower_dirs=lower[::-1],
        )

    # ------------------------------------------------------------ removal

    def remove(self, reference: str, force: bool) -> list[str]:
        """Remove a name, or the image with all its names; what was removed.

        The list holds the names removed, then the digests of the blobs
        deleted because no other image references them.
        """
        with self._lock:
            record, by_name = self.resolve(reference)
            if by_name and len(record.names) > 1:
                name = str(parse_reference(reference.strip()))
                kept = [n for n in record.names if n != name]
                self.images[record.id] = msgspec.structs.replace(record, names=kept)
                self._save_index()
                return [name]
            if not by_name and len(record.names) > 1 and not force:
                raise ConflictError(
                    f"image {record.id[:19]} has {len(record.names)} names "
                    f"({', '.join(record.names)}); remove them by name, or use --force"
                )
            del self.images[record.id]
            self._save_index()
            deleted = self._collect_garbage()
            return [*record.names, *deleted]

    def _collect_garbage(self) -> list[str]:
        """Delete blobs and layers no image references and no import is using (lock held)."""
        keep = set(self._pins)
        for record in self.images.values():
            keep.update([record.id, record.manifest_digest, *record.layers, *record.diff_ids])
        deleted: list[str] = []
        for entry in list(os.scandir(self.blob_dir)):
            digest = f"sha256:{entry.name}"
            if digest not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    deleted.append(digest)
        for entry in list(os.scandir(self.layer_dir)):
            if f"sha256:{entry.name}" not in keep:
                # Out of layers/ first, so a crash mid-delete leaves no hollow layer.
                trash = self.tmp_dir / f"trash-{uuid.uuid4().hex}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(entry.path, trash)
                    shutil.rmtree(trash, ignore_errors=True)
        return deleted

    # ------------------------------------------------------------ registry pulls and pushes

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def partial_path(self, digest: str) -> Path:
        return self.partial_dir / _hex(digest)

    def work_path(self) -> Path:
        """A fresh name under tmp/ for a layer unpacked as it downloads."""
        return self.tmp_dir / f"unpack-{uuid.uuid4().hex}"

    def keep_download(self, digest: str) -> None:
        """Put a verified, durable download from partial/ into blobs/.

        A hard link, not a move: until the pull commits (which removes the
        partial file), a daemon killed mid-pull, whose start-up clean-up
        drops blobs no image references, still finds the whole download in
        partial/ and needs to fetch nothing of it again.
        """
        final = self.blob_path(digest)
        partial = self.partial_path(digest)
        with self._key_lock(digest):
            if not final.is_file():
                os.link(partial, final)

    def sync(self) -> None:
        """Write everything the store holds to disk (blocking): what a pull received is
        durable before it is linked into blobs/ or renamed into layers/.

        A syncfs of the store's file system, not a sync of every file system on
        the machine; of each, where blobs/ or layers/ is mounted apart (what is
        linked or renamed into them comes from partial/ and tmp/ beside them).
        """
        synced: set[int] = set()
        for directory in (self.root, self.blob_dir, self.layer_dir, self.partial_dir, self.tmp_dir):
            try:
                device = os.stat(directory).st_dev
            except FileNotFoundError:
                continue
            if device not in synced:
                synced.add(device)
                syncfs(directory)

    def adopt_layers(self, layers: list[tuple[str, Path]]) -> None:
        """Make layers unpacked under tmp/ trusted: (diff id, work directory) pairs.

        Their files must be on disk already (:meth:`sync` after they were
        written: the pull syncs each blob with its tree before keeping it).
        Each is renamed into layers/, unless another import put it there
        first. Pin the diff ids first.
        """
        for diff_id, work in layers:
            final = self.layer_path(diff_id)
            with self._key_lock("layer:" + diff_id):
                if final.is_dir():
                    shutil.rmtree(work, ignore_errors=True)
                else:
                    os.rename(work, final)

    def pin(self, *keys: str) -> list[str]:
        """Keep blobs and layers safe from clean-ups until :meth:`unpin` (a pull or push)."""
        pinned: list[str] = []
        self._pin(pinned, *keys)
        return pinned

    def unpin(self, pinned: list[str]) -> None:
        self._unpin(pinned)

    def record_for_pull(self, digest: str) -> ImageRecord | None:
        """The stored image whose manifest is ``digest``, if all its parts are here."""
        with self._lock:
            for record in self.images.values():
                if record.manifest_digest == digest and self._complete(record):
                    return record
        return None

    def tag(self, record_id: str, name: str) -> ImageInfo:
        """Add ``name`` to a stored image (a pull of what is already here)."""
        with self._lock:
            record = self.images[record_id]
            if name in record.names:  # names are unique: nothing changes, nothing to save
                return record.info()
            return self._commit(record, [name])

    def commit_pull(
        self,
        name: str,
        manifest: bytes,
        manifest_digest: str,
        config: bytes,
        layers: list[tuple[str, int]],
    ) -> ImageInfo:
        """Store a pulled image: its verified downloads move from partial/ into blobs/,
        its layers are unpacked, and ``name`` points at it."""
        for digest, _size in layers:
            final = self.blob_path(digest)
            partial = self.partial_path(digest)
            with self._key_lock(digest):
                if final.is_file():
                    partial.unlink(missing_ok=True)
                elif partial.is_file():
                    with open(partial, "rb") as handle:
                        os.fsync(handle.fileno())
                    os.rename(partial, final)
                else:
                    raise UnavailableError(
                        f"the download of layer {digest} vanished before it was stored; pull again"
                    )

        def from_store(digest: str) -> SourceBlob:
            path = self.blob_path(digest)
            return SourceBlob(open=lambda: open(path, "rb"), digest=digest, size=None)

        image = SourceImage(
            names=[],
            config=SourceBlob(open=lambda: io.BytesIO(config), digest=_digest(config)),
            layers=[from_store(digest) for digest, _ in layers],
            manifest=manifest,
            manifest_digest=manifest_digest,
        )
        return self._import_one(image, name, name)

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as handle:
                return handle.read(MAX_CONFIG + 1)
        except FileNotFoundError:
            raise UnavailableError(
                f"blob {digest} is missing from the store; pull or import the image again"
            ) from None

    def manifest_of(self, record: ImageRecord) -> tuple[bytes, dict[str, Any]]:
        data = self.read_blob(record.manifest_digest)
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise UnavailableError(f"the manifest of image {record.id} in the store is unreadable")
        return data, document

    # ------------------------------------------------------------ prune

    def prune(self, in_use: set[str], busy_partials: set[str]) -> tuple[list[str], list[str]]:
        """Remove images whose id is not in ``in_use``, then what no image references.

        Returns (names or ids of the images removed, digests of the blobs
        deleted). Downloads left in partial/ go too, unless a pull is using them.
        """
        with self._lock:
            removed_images: list[str] = []
            for record in list(self.images.values()):
                if record.id in in_use or record.id in self._pins:
                    continue
                del self.images[record.id]
                removed_images.extend(record.names or [record.id])
            if removed_images:
                self._save_index()
            deleted = self._collect_garbage()
        for entry in list(os.scandir(self.partial_dir)):
            if f"sha256:{entry.name}" not in busy_partials:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        return removed_images, deleted

    # ------------------------------------------------------------ export

    def export(self, reference: str, out: IO[bytes], compress: bool) -> ImageInfo:
        """Write the image as an oci-archive (gzipped as a whole with ``compress``) to ``out``."""
        record, _ = self.resolve(reference)
        pinned = self.pin(record.id, record.manifest_digest, *record.layers)
        try:
            manifest, document = self.manifest_of(record)
            media_type = str(document.get("mediaType") or OCI_MANIFEST)
            descriptor: dict[str, Any] = {
                "mediaType": media_type,
                "digest": record.manifest_digest,
                "size": len(manifest),
            }
            if record.names:
                name = parse_reference(record.names[0])
                descriptor["annotations"] = {
                    "io.containerd.image.name": record.names[0],
                    "org.opencontainers.image.ref.name": name.tag or "latest",
                }
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}
            mode = "w|gz" if compress else "w|"
            with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
                _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
                _add_bytes(tar, "index.json", json.dumps(index).encode())
                for digest in dict.fromkeys([record.manifest_digest, record.id, *record.layers]):
                    path = self.blob_path(digest)
                    info = tarfile.TarInfo(f"blobs/sha256/{_hex(digest)}")
                    info.size = path.stat().st_size
                    info.mode = 0o644
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
            return record.info()
        finally:
            self.unpin(pinned)


OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
