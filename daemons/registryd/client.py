"""Pulls and pushes: the jobs registryd runs against registries.

:class:`RegistryClient` holds what every transfer shares: one aiohttp
session, the bearer token cache, the credentials (:mod:`.auth`), the
settings (mirrors, insecure registries, concurrency) and a lock per blob so
two pulls never write the same partial file. A pull resolves the reference
(mirrors first, then the registry; an index down to this node's platform),
then downloads the missing layer blobs concurrently. Each blob streams
through a thread of its own (:func:`.unpack.receive_blob`) that, in one
pass, appends it to ``partial/``, hashes it and unpacks it into ``tmp/``
(one such thread per core works at a time; one waiting for bytes does not count);
a broken connection is resumed with ``Range``, here or after a restart.
A blob whose digest matches is synced to disk with its unpacked tree (one
sync of the store, shared by every blob that ended while the last one ran,
rather than a flush per file) and only then linked into ``blobs/``; once
every layer is there, the trees are renamed into ``layers/`` and the store
names the image. A warm pull is one manifest request and one look at the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from daemons.registryd.auth import Challenge, CredentialStore, TokenCache
from daemons.registryd.distribution import (
    INDEX_TYPES,
    OCI_MANIFEST,
    CorruptBlobError,
    InterruptedTransferError,
    Platform,
    Repository,
    UnresumableTransferError,
    Upload,
    bus_error,
    choose_manifest,
    node_platform,
    registry_url,
)
from daemons.registryd.settings import RegistrySettings
from daemons.registryd.sources import sha256_hex_of
from daemons.registryd.store import MAX_CONFIG, ImageStore
from daemons.registryd.unpack import Pipe, ReaderGoneError, human_size, receive_blob
from shared.bus import InvalidArgumentError, NotFoundError, UnavailableError, ZLayerError
from shared.credentials import Credential
from shared.jobs import Job
from shared.lazy import lazy_module
from shared.reference import DEFAULT_DOMAIN, InvalidReferenceError, Reference, parse_reference
from shared.wire import encode
from shared.wire.registry import ImageInfo, PushResult

if TYPE_CHECKING:
    import aiohttp
else:
    # with the first pull or push, not at start
    aiohttp = lazy_module("aiohttp")

log = logging.getLogger("zlayer.registryd.client")

BLOB_ATTEMPTS = 4  # a blob whose connection breaks is resumed this many times in one pull
RECEIVER_THREADS = 32  # blobs hashed and unpacked at once, over every pull
MAX_INDEX_DEPTH = 4
T = TypeVar("T")
Work = Callable[..., Awaitable[Any]]


@dataclass
class Resolved:
    repository: Repository
    manifest: bytes
    digest: str
    document: dict[str, Any]


def parse_user_reference(text: str) -> Reference:
    try:
        return parse_reference(text.strip())
    except InvalidReferenceError as exc:
        raise InvalidArgumentError(str(exc)) from None


def normalise_registry(text: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``host:5000/`` -> ``host:5000``."""
    host = text.strip().removeprefix("https://").removeprefix("http://").split("/")[0]
    if not host:
        raise InvalidArgumentError("give a registry host name, like registry.example.com")
    if host in ("index.docker.io", "registry-1.docker.io"):
        return DEFAULT_DOMAIN
    return host


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


class RegistryClient:
    """Pulls, pushes and logins of one registryd."""

    def __init__(
        self,
        store: ImageStore,
        settings: RegistrySettings,
        credentials: CredentialStore,
        work: Callable[..., Awaitable[Any]],
    ) -> None:
        self.store = store
        self.settings = settings
        self.credentials = credentials
        self.work = work  # the daemon's thread runner for store calls
        self.tokens = TokenCache()
        self.platform: Platform = node_platform()
        self._http: aiohttp.ClientSession | None = None
        self._blob_locks: dict[str, asyncio.Lock] = {}
        self.busy_partials: set[str] = set()
        self._pulls: dict[str, tuple[asyncio.Task[ImageInfo], _Progress]] = {}
        self._receiver_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._probes: dict[str, Challenge | None] = {}  # base URL -> what its /v2/ asked
        self.ranged_resumes = 0
        # syncs of the store shared by the blobs that end meanwhile (_sync_store)
        self._sync_lock = asyncio.Lock()
        self._sync_requested = 0
        self._synced_upto = 0
        self._reserved = 0  # bytes downloads in progress still expect, over every pull

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=16),
                auto_decompress=False,
            )
        return self._http

    async def close(self) -> None:
        tasks = [task for task, _ in self._pulls.values()]
        for task in tasks:
            task.cancel()
        # Each stops its receiving threads and removes its half-unpacked trees.
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._receiver_pool is not None:
            self._receiver_pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            await self._http.close()

    # ------------------------------------------------------------ repositories

    def credential(self, registry: str, passed: str) -> Credential | None:
        if passed:
            found = Credential.decode(passed)
            if found is not None:
                return found
        return self.credentials.get(registry)

    def repository(
        self,
        ref: Reference,
        actions: str,
        auth: str,
        base_url: str | None = None,
        extra_scopes: tuple[str, ...] = (),
        plain_http: bool = False,
    ) -> Repository:
        insecure = [*self.settings.insecure_registries, *([ref.domain] if plain_http else [])]
        base = base_url or registry_url(ref.domain, insecure)
        registry = ref.domain
        credential_host = registry if base_url is None else base.split("://", 1)[1]
        return Repository(
            self.http,
            registry=registry,
            base_url=base,
            path=ref.path,
            actions=actions,
            credential=self.credential(credential_host, auth if base_url is None else ""),
            tokens=self.tokens,
            timeout=self.settings.request_timeout,
            extra_scopes=extra_scopes,
            probes=self._probes if actions == "pull" else None,
        )

    def endpoints(self, ref: Reference) -> list[str | None]:
        """Mirror base URLs in order, then None for the registry itself."""
        return [*self.settings.mirrors.get(ref.domain, []), None]

    # ------------------------------------------------------------ resolve

    async def resolve(self, ref: Reference, auth: str) -> Resolved:
        """The manifest of ``ref`` for this node's platform, from a mirror or the registry."""
        problems: list[str] = []
        endpoints = self.endpoints(ref)
        for number, base in enumerate(endpoints, start=1):
            repository = self.repository(ref, "pull", auth, base)
            try:
                return await self._resolve_at(repository, ref)
            except (UnavailableError, NotFoundError, ZLayerError) as exc:
                if number == len(endpoints):
                    raise
                problems.append(f"{repository.host}: {exc.args[0] if exc.args else exc}")
                log.warning("mirror %s failed for %s: %s", repository.host, ref, problems[-1])
        raise AssertionError("unreachable")

    async def _resolve_at(self, repository: Repository, ref: Reference) -> Resolved:
        body, media_type, digest = await repository.get_manifest(ref.digest or ref.tag or "latest")
        for _depth in range(MAX_INDEX_DEPTH):
            document = json.loads(body)
            if media_type not in INDEX_TYPES:
                return Resolved(repository, body, digest, document)
            chosen = choose_manifest(document, self.platform, ref.familiar())
            body, media_type, digest = await repository.get_manifest(chosen)
        raise ZLayerError(f"the image index of {ref.familiar()} nests too deeply")

    # ------------------------------------------------------------ pull

    def pull_task(self, reference: str, auth: str) -> tuple[asyncio.Task[ImageInfo], _Progress]:
        """The running pull of ``reference``, or a new one; every caller shares it."""
        ref = parse_user_reference(reference)
        key = str(ref)
        running = self._pulls.get(key)
        if running is not None and not running[0].done():
            return running
        progress = _Progress()
        task = asyncio.create_task(self._pull(ref, auth, progress), name=f"pull {key}")
        self._pulls[key] = (task, progress)
        task.add_done_callback(lambda t: self._forget(key, t))
        return task, progress

    def _forget(self, key: str, task: asyncio.Task[ImageInfo]) -> None:
        if key in self._pulls and self._pulls[key][0] is task:
            del self._pulls[key]
        if not task.cancelled():
            task.exception()  # a failure nobody awaited must not be logged as lost

    async def pull_job(self, job: Job, reference: str, auth: str) -> str:
        task, progress = self.pull_task(reference, auth)
        progress.jobs.append(job)
        progress.replay(job)
        info = await task
        return encode(info)

    async def _pull(self, ref: Reference, auth: str, progress: _Progress) -> ImageInfo:
        try:
            return await self._pull_unchecked(ref, auth, progress)
        except (InterruptedTransferError, CorruptBlobError) as exc:
            raise bus_error(exc) from None

    async def _pull_unchecked(self, ref: Reference, auth: str, progress: _Progress) -> ImageInfo:
        started = time.monotonic()
        name = str(ref)
        resolved = await self.resolve(ref, auth)
        manifest = resolved.document
        config = manifest.get("config")
        layers = manifest.get("layers")
        if not isinstance(config, dict) or not isinstance(layers, list):
            raise ZLayerError(f"the manifest of {ref.familiar()} has no config or layers")
        descriptors = [(str(d.get("digest")), int(d.get("size") or 0)) for d in layers]
        self._check_sizes(ref, descriptors)
        existing: ImageInfo | None = await self.work(self._name_stored, resolved.digest, name)
        if existing is not None:
            for number, (digest, size) in enumerate(descriptors, start=1):
                progress.set(_label(number, digest), done=size, total=size, state="exists")
            return existing
        config_digest = str(config.get("digest"))
        # In a thread, as every store call: a pin waits for a clean-up holding the store.
        pinned = await self.work(
            self.store.pin, resolved.digest, config_digest, *(d for d, _ in descriptors)
        )
        unpacked: list[tuple[str, Path]] = []  # (diff id, work directory) not yet adopted
        try:
            for number, (digest, size) in enumerate(descriptors, start=1):
                progress.set(_label(number, digest), done=0, total=size, state="waiting")
            if await self.work(self.store.has_blob, config_digest):
                config_bytes = await self.work(self.store.read_blob, config_digest)
            else:
                config_bytes = await resolved.repository.get_small_blob(config_digest, MAX_CONFIG)
            diff_ids = _stream_diff_ids(manifest, config_bytes)
            if diff_ids is not None:
                pinned.extend(await self.work(self.store.pin, *diff_ids))
            limit = asyncio.Semaphore(self.settings.max_concurrent_downloads)
            labels: dict[str, list[str]] = {}  # a blob listed twice is fetched once
            diff_of: dict[str, str | None] = {}
            for number, (digest, _size) in enumerate(descriptors):
                labels.setdefault(digest, []).append(_label(number + 1, digest))
                diff_of.setdefault(digest, diff_ids[number] if diff_ids is not None else None)

            async def fetch(digest: str, size: int) -> None:
                async with limit:
                    work = await self._fetch_blob(
                        resolved.repository, digest, size, diff_of[digest], labels[digest], progress
                    )
                if work is not None:
                    unpacked.append((str(diff_of[digest]), work))

            sizes = dict(descriptors)
            async with asyncio.TaskGroup() as group:
                for digest in labels:
                    group.create_task(fetch(digest, sizes[digest]))
            await self.work(self.store.adopt_layers, unpacked)
            unpacked.clear()
            info: ImageInfo = await self.work(
                self.store.commit_pull,
                name,
                resolved.manifest,
                resolved.digest,
                config_bytes,
                descriptors,
            )
        except* Exception as group:
            raise group.exceptions[0] from None
        finally:
            if unpacked:
                await asyncio.shield(asyncio.to_thread(_remove_trees, [w for _, w in unpacked]))
            await asyncio.shield(asyncio.to_thread(self.store.unpin, pinned))
        for number, (digest, size) in enumerate(descriptors, start=1):
            progress.set(_label(number, digest), done=size, state="done")
        log.info("pulled %s (%s) in %.2fs", name, info.id, time.monotonic() - started)
        return info

    def _check_sizes(self, ref: Reference, descriptors: list[tuple[str, int]]) -> None:
        """Refuse a layer the manifest declares larger than ``max_layer_size``."""
        limit = self.settings.max_layer_size
        for number, (digest, size) in enumerate(descriptors, start=1):
            if size > limit:
                raise ZLayerError(
                    f"layer {number} ({short(digest)}) of {ref.familiar()} is "
                    f"{human_size(size)}, more than max_layer_size ({human_size(limit)}); raise "
                    "max_layer_size in registryd.toml if the image is trusted"
                )

    @contextlib.asynccontextmanager
    async def _space_for(self, digest: str, need: int) -> AsyncIterator[None]:
        """Hold ``need`` bytes of the store's disk for a download; refuse if it cannot.

        What other downloads still expect is counted as taken: the check is
        made as each starts, before the others have written their share.
        """
        usage = await asyncio.to_thread(shutil.disk_usage, self.store.partial_dir)
        free = max(0, usage.free - self._reserved)
        if need > free:
            raise UnavailableError(
                f"not enough space in {self.store.root}: layer {short(digest)} needs "
                f"{human_size(need)}, {human_size(free)} free; free some space (zlayerctl "
                "system prune) or move the store to a larger disk, then pull again"
            )
        self._reserved += need
        try:
            yield
        finally:
            self._reserved -= need

    def _name_stored(self, manifest_digest: str, name: str) -> ImageInfo | None:
        """``name`` on the stored image of ``manifest_digest``, if it is all here (blocking)."""
        record = self.store.record_for_pull(manifest_digest)
        if record is None:
            return None
        info: ImageInfo = self.store.tag(record.id, name)
        return info

    async def _fetch_blob(
        self,
        repository: Repository,
        digest: str,
        size: int,
        diff_id: str | None,
        labels: list[str],
        progress: _Progress,
    ) -> Path | None:
        """Download one layer blob into the store, unpacking it as it arrives.

        The blob is checked against its digest as it streams and moved into
        blobs/ only when it matches. With a ``diff_id`` whose layer is not
        unpacked yet, it is unpacked in the same pass into a directory under
        tmp/, returned for the caller to adopt once every layer is there.
        """
        lock = self._blob_locks.setdefault(digest, asyncio.Lock())
        async with lock:
            have_blob, have_layer = await self.work(self._stored, digest, diff_id)
            if have_blob:
                progress.set_all(labels, done=size, state="exists")
                return None
            self.busy_partials.add(digest)
            try:
                return await self._receive(
                    repository, digest, size, None if have_layer else diff_id, labels, progress
                )
            finally:
                self.busy_partials.discard(digest)

    def _stored(self, digest: str, diff_id: str | None) -> tuple[bool, bool]:
        """(blob stored, layer unpacked) (blocking)."""
        layer = diff_id is not None and self.store.layer_path(diff_id).is_dir()
        return self.store.has_blob(digest), layer

    async def _receive(
        self,
        repository: Repository,
        digest: str,
        size: int,
        diff_id: str | None,
        labels: list[str],
        progress: _Progress,
    ) -> Path | None:
        partial = self.store.partial_path(digest)
        for start in (1, 2):
            try:
                prefix = await asyncio.to_thread(_partial_size, partial, size)
                async with self._space_for(digest, max(0, size - prefix)):
                    return await self._receive_once(
                        repository, digest, size, diff_id, labels, progress, partial, prefix
                    )
            except UnresumableTransferError as exc:
                await asyncio.to_thread(partial.unlink, True)
                if start == 2:
                    raise
                log.warning("%s; starting it again", exc.args[0])
        raise AssertionError("unreachable")

    async def _receive_once(
        self,
        repository: Repository,
        digest: str,
        size: int,
        diff_id: str | None,
        labels: list[str],
        progress: _Progress,
        partial: Path,
        prefix: int,
    ) -> Path | None:
        """A blob from byte ``prefix`` through a receiving thread, resumed as often as it breaks."""
        work = self.store.work_path() if diff_id is not None else None
        pipe = Pipe()
        receiver = asyncio.get_running_loop().run_in_executor(
            self._receivers(),
            receive_blob,
            pipe,
            partial,
            prefix,
            (digest, size),
            work,
            diff_id,
            self.settings.max_layer_unpacked_size,
        )
        have = prefix
        limit = self.settings.max_layer_size
        oversized = False

        async def write(data: bytes) -> None:
            nonlocal have, oversized
            if size and have + len(data) > size:
                raise CorruptBlobError(_corrupt(repository, digest))
            if have + len(data) > limit:  # only a blob of no declared size gets here
                oversized = True
                raise ZLayerError(
                    f"the registry {repository.registry} sent more than max_layer_size "
                    f"({human_size(limit)}) of blob {digest}, which declares no size; raise "
                    "max_layer_size in registryd.toml if the image is trusted"
                )
            try:
                await pipe.write(data)
            except ReaderGoneError:
                await receiver  # raises the thread's own error
                raise
            have += len(data)
            progress.set_all(labels, done=have)

        try:
            progress.set_all(labels, done=have, state="downloading")
            attempt = 0
            while have < size or not size:
                attempt += 1
                try:
                    if await repository.download_blob(digest, have, write):
                        self.ranged_resumes += 1
                    if size and have < size:
                        raise InterruptedTransferError(
                            f"the registry {repository.host} ended blob {digest} after "
                            f"{have} of {size} bytes"
                        )
                    break
                except UnresumableTransferError:
                    raise
                except InterruptedTransferError as exc:
                    if attempt >= BLOB_ATTEMPTS:
                        raise UnavailableError(
                            f"{exc.args[0]} while pulling {repository.path}; run the pull "
                            "again to resume it"
                        ) from None
                    log.warning("%s; resuming (attempt %d)", exc.args[0], attempt + 1)
                    progress.set_all(labels, state="resuming")
                    await asyncio.sleep(0.2 * attempt)
            pipe.end()
            progress.set_all(labels, done=have, state="unpacking")
            received = await receiver
        except BaseException as exc:
            pipe.abort()  # the thread stops; a broken download's partial file stays
            with contextlib.suppress(BaseException):
                await asyncio.shield(receiver)
            if work is not None:  # the thread may have finished it just before
                await asyncio.shield(asyncio.to_thread(_remove_trees, [work]))
            if isinstance(exc, CorruptBlobError) or oversized:  # nothing to resume
                await asyncio.to_thread(partial.unlink, True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise UnavailableError(
                    f"not enough space in {self.store.root}: the disk filled while layer "
                    f"{short(digest)} downloaded; free some space (zlayerctl system prune) or "
                    "move the store to a larger disk, then pull again"
                ) from None
            if isinstance(exc, OSError):
                where = f" ({exc.filename})" if exc.filename else ""
                log.exception("receiving blob %s failed", digest)
                raise ZLayerError(f"the image store failed: {exc.strerror or exc}{where}") from None
            raise
        if received.digest != digest or (size and received.size != size):
            raise CorruptBlobError(_corrupt(repository, digest))
        try:
            # on disk before it counts as stored: the blob, and the tree adopt_layers renames
            await self._sync_store()
            await self.work(self.store.keep_download, digest)
        except BaseException:  # cancelled too (another layer failed): the tree is nobody's
            if work is not None and received.unpacked:
                await asyncio.shield(asyncio.to_thread(_remove_trees, [work]))
            raise
        progress.set_all(labels, done=have, state="unpacked" if received.unpacked else "stored")
        return work if received.unpacked else None

    async def _sync_store(self) -> None:
        """Return once a sync of the store that began after this call has ended.

        Blobs that end while a sync runs share the next one: a pull of six
        layers syncs once or twice, not once per file and again per tree.
        Each caller's files are written before it asks, so a sync that
        starts after the ask covers them.
        """
        self._sync_requested += 1
        ticket = self._sync_requested
        async with self._sync_lock:
            if self._synced_upto >= ticket:
                return  # a sync that began after this ask has ended
            upto = self._sync_requested
            await asyncio.to_thread(self.store.sync)
            self._synced_upto = max(self._synced_upto, upto)

    def _receivers(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that take blobs as they arrive (never the loop's default pool)."""
        if self._receiver_pool is None:
            self._receiver_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=RECEIVER_THREADS, thread_name_prefix="receive"
            )
        return self._receiver_pool

    # ------------------------------------------------------------ push

    async def push_job(self, job: Job, source: str, destination: str, auth: str) -> str:
        try:
            return await self._push(job, source, destination, auth)
        except (InterruptedTransferError, CorruptBlobError) as exc:
            raise bus_error(exc) from None

    async def _push(self, job: Job, source: str, destination: str, auth: str) -> str:
        record, _ = await self.work(self.store.resolve, source)
        if destination:
            dest = parse_user_reference(destination)
        else:
            named = (
                [
                    n
                    for n in record.names
                    if source.strip() and n == str(parse_user_reference(source))
                ]
                if not source.startswith("sha256:")
                else []
            )
            if not named:
                raise InvalidArgumentError(
                    f"{source} is not an image name; give a destination, like "
                    "registry.example.com/team/app:1"
                )
            dest = parse_user_reference(named[0])
        manifest, document = await self.work(self.store.manifest_of, record)
        media_type = str(document.get("mediaType") or OCI_MANIFEST)
        blobs = [(record.id, len(await self.work(self.store.read_blob, record.id)), "config")]
        for number, layer in enumerate(document.get("layers") or [], start=1):
            blobs.append(
                (
                    str(layer.get("digest")),
                    int(layer.get("size") or 0),
                    _label(number, str(layer.get("digest"))),
                )
            )
        # A blob an image's other name on the same registry holds can be mounted, not sent.
        mount_from = [
            parsed.path
            for parsed in map(parse_reference, record.names)
            if parsed.domain == dest.domain and parsed.path != dest.path
        ]
        pinned = await self.work(self.store.pin, record.manifest_digest, *(d for d, _, _ in blobs))
        try:
            await self.upload(
                job,
                dest,
                auth,
                [Upload(d, size, label, self.store.blob_path(d)) for d, size, label in blobs],
                manifest,
                media_type,
                record.manifest_digest,
                mount_from=mount_from,
            )
        finally:
            await asyncio.shield(asyncio.to_thread(self.store.unpin, pinned))
        log.info("pushed %s as %s", record.id, dest)
        return encode(PushResult(reference=str(dest), digest=record.manifest_digest, id=record.id))

    async def upload(
        self,
        job: Job,
        dest: Reference,
        auth: str,
        blobs: list[Upload],
        manifest: bytes,
        media_type: str,
        manifest_digest: str,
        *,
        mount_from: list[str] | None = None,
        plain_http: bool = False,
    ) -> None:
        """Send ``blobs`` (those the registry lacks) then ``manifest`` to ``dest``.

        Blobs go concurrently, each checked first (``exists``), mounted from
        another repository of the same registry where one of ``mount_from``
        holds it, uploaded otherwise. The manifest goes last, under the tag
        or digest of ``dest``; a registry that reports another digest for it
        than ``manifest_digest`` is an error.
        """
        sources = mount_from or []
        repository = self.repository(
            dest,
            "pull,push",
            auth,
            extra_scopes=tuple(f"repository:{p}:pull" for p in sources),
            plain_http=plain_http,
        )
        limit = asyncio.Semaphore(self.settings.max_concurrent_uploads)

        async def send(blob: Upload) -> None:
            async with limit:
                job.progress(blob.label, done=0, total=blob.size, state="checking")
                if await repository.blob_exists(blob.digest):
                    job.progress(blob.label, done=blob.size, state="exists")
                    return
                location = None
                for source_path in sources:
                    location = await repository.mount_blob(blob.digest, source_path)
                    if location is None:
                        job.progress(blob.label, done=blob.size, state="mounted")
                        return
                if location is None:
                    location = await repository.start_upload()
                job.progress(blob.label, state="uploading")
                await repository.upload_blob(
                    location,
                    blob.path,
                    blob.digest,
                    blob.size,
                    self.settings.chunk_size,
                    lambda done: job.progress(blob.label, done=done),
                )
                job.progress(blob.label, done=blob.size, state="pushed")

        try:
            async with asyncio.TaskGroup() as group:
                for blob in blobs:
                    group.create_task(send(blob))
            pushed = await repository.put_manifest(
                dest.digest or dest.tag or "latest", manifest, media_type
            )
        except* Exception as group:
            first = group.exceptions[0]
            if isinstance(first, InterruptedTransferError | CorruptBlobError):
                raise bus_error(first) from None
            raise first from None
        if pushed and pushed != manifest_digest:
            raise ZLayerError(
                f"the registry {dest.domain} stored the manifest as {pushed}, not {manifest_digest}"
            )

    # ------------------------------------------------------------ login

    async def login(self, registry: str, username: str, password: str) -> str:
        host = normalise_registry(registry)
        if not username:
            raise InvalidArgumentError("give a user name")
        credential = Credential(username, password)
        repository = Repository(
            self.http,
            registry=host,
            base_url=registry_url(host, self.settings.insecure_registries),
            path="",
            actions="pull",
            credential=credential,
            tokens=self.tokens,
            timeout=self.settings.request_timeout,
        )
        try:
            await repository.verify_login()
        except InterruptedTransferError as exc:
            raise bus_error(exc) from None
        await self.work(self.credentials.set, host, credential)
        return host

    async def logout(self, registry: str) -> bool:
        host = normalise_registry(registry)
        removed: bool = await self.work(self.credentials.remove, host)
        return removed


def _label(number: int, digest: str) -> str:
    return f"layer {number} {short(digest)}"


def _stream_diff_ids(manifest: dict[str, Any], config: bytes) -> list[str] | None:
    """The diff ids to unpack an image's layers by as they download; None to unpack after.

    Only tar layers (plain, gzip, zstd) are unpacked as they stream, and
    only when the config lists a valid diff id for each; anything else (a
    WebAssembly artifact, an odd config) takes the store's own path.
    """
    layers = manifest.get("layers") or []
    config_type = str((manifest.get("config") or {}).get("mediaType") or "")
    kinds = [str(layer.get("mediaType") or "") for layer in layers if isinstance(layer, dict)]
    if len(kinds) != len(layers) or any("wasm" in k for k in (*kinds, config_type)):
        return None
    if "wasm" in str(manifest.get("artifactType") or "") or not all("tar" in k for k in kinds):
        return None
    try:
        document = json.loads(config)
        diff_ids = document["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        return None
    if not all(isinstance(d, str) and sha256_hex_of(d) is not None for d in diff_ids):
        return None
    return [str(d) for d in diff_ids]


def _partial_size(partial: Path, size: int) -> int:
    """How much of a blob an earlier attempt left in ``partial`` (too much: none of it)."""
    try:
        have = os.stat(partial).st_size
    except FileNotFoundError:
        return 0
    if size and have > size:
        partial.unlink(missing_ok=True)
        return 0
    return have


def _remove_trees(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _corrupt(repository: Repository, digest: str) -> str:
    return (
        f"the registry {repository.registry} sent blob {digest} of {repository.path} with "
        "content that does not match its digest; it was thrown away and nothing was kept"
    )


class _Progress:
    """Per-layer progress of one pull, mirrored into every job that waits on it."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.items: dict[str, dict[str, Any]] = {}

    def set(self, label: str, **values: Any) -> None:
        current = self.items.setdefault(label, {})
        current.update({k: v for k, v in values.items() if v is not None})
        for job in self.jobs:
            job.progress(label, **values)

    def set_all(self, labels: list[str], **values: Any) -> None:
        for label in labels:
            self.set(label, **values)

    def replay(self, job: Job) -> None:
        for label, values in self.items.items():
            with contextlib.suppress(Exception):
                job.progress(label, **values)
