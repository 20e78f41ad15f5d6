"""Pulls and pushes: the jobs registryd runs against registries.

:class:`RegistryClient` holds what every transfer shares: one aiohttp
session, the bearer token cache, the credentials (:mod:`.auth`), the
settings (mirrors, insecure registries, concurrency) and a lock per blob so
two pulls never write the same partial file. A pull resolves the reference
(mirrors first, then the registry; an index down to this node's platform),
downloads the missing blobs concurrently into ``partial/`` (resumed with
``Range`` after a broken connection, here or after a restart), then lets
the store move them into ``blobs/``, unpack the layers and name the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from daemons.registryd.auth import CredentialStore, TokenCache
from daemons.registryd.distribution import (
    INDEX_TYPES,
    OCI_MANIFEST,
    CorruptBlobError,
    InterruptedTransferError,
    Platform,
    Repository,
    Upload,
    bus_error,
    choose_manifest,
    node_platform,
    registry_url,
)
from daemons.registryd.settings import RegistrySettings
from daemons.registryd.store import MAX_CONFIG, ImageStore
from shared.bus import InvalidArgumentError, NotFoundError, UnavailableError, ZLayerError
from shared.credentials import Credential
from shared.jobs import Job
from shared.reference import DEFAULT_DOMAIN, InvalidReferenceError, Reference, parse_reference
from shared.wire.registry import ImageInfo

log = logging.getLogger("zlayer.registryd.client")

BLOB_ATTEMPTS = 4  # a blob whose connection breaks is resumed this many times in one pull
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
        self.ranged_resumes = 0

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=16),
                auto_decompress=False,
            )
        return self._http

    async def close(self) -> None:
        for task, _ in list(self._pulls.values()):
            task.cancel()
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
        return info.model_dump_json()

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
        existing = await self.work(self.store.record_for_pull, resolved.digest)
        if existing is not None:
            for number, (digest, size) in enumerate(descriptors, start=1):
                progress.set(_label(number, digest), done=size, total=size, state="exists")
            info: ImageInfo = await self.work(self.store.tag, existing.id, name)
            return info
        config_digest = str(config.get("digest"))
        pinned = self.store.pin(resolved.digest, config_digest, *(d for d, _ in descriptors))
        try:
            for number, (digest, size) in enumerate(descriptors, start=1):
                progress.set(_label(number, digest), done=0, total=size, state="waiting")
            if await self.work(self.store.has_blob, config_digest):
                config_bytes = await self.work(self.store.read_blob, config_digest)
            else:
                config_bytes = await resolved.repository.get_small_blob(config_digest, MAX_CONFIG)
            limit = asyncio.Semaphore(self.settings.max_concurrent_downloads)

            async def fetch(number: int, digest: str, size: int) -> None:
                async with limit:
                    await self._fetch_blob(
                        resolved.repository, digest, size, _label(number, digest), progress
                    )

            async with asyncio.TaskGroup() as group:
                for number, (digest, size) in enumerate(descriptors, start=1):
                    group.create_task(fetch(number, digest, size))
            for number, (digest, size) in enumerate(descriptors, start=1):
                progress.set(_label(number, digest), done=size, state="unpacking")
            info = await self.work(
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
            self.store.unpin(pinned)
        for number, (digest, size) in enumerate(descriptors, start=1):
            progress.set(_label(number, digest), done=size, state="done")
        log.info("pulled %s (%s) in %.2fs", name, info.id, time.monotonic() - started)
        return info

    async def _fetch_blob(
        self, repository: Repository, digest: str, size: int, label: str, progress: _Progress
    ) -> None:
        lock = self._blob_locks.setdefault(digest, asyncio.Lock())
        async with lock:
            if await self.work(self.store.has_blob, digest):
                progress.set(label, done=size, state="exists")
                return
            partial = self.store.partial_path(digest)
            self.busy_partials.add(digest)
            try:
                for attempt in range(1, BLOB_ATTEMPTS + 1):
                    progress.set(label, state="downloading" if attempt == 1 else "resuming")
                    try:
                        ranged = await repository.download_blob(
                            digest, size, partial, lambda done: progress.set(label, done=done)
                        )
                    except InterruptedTransferError as exc:
                        if attempt == BLOB_ATTEMPTS:
                            raise UnavailableError(
                                f"{exc.args[0]} while pulling {repository.path}; run the pull "
                                "again to resume it"
                            ) from None
                        log.warning("%s; resuming (attempt %d)", exc.args[0], attempt + 1)
                        await asyncio.sleep(0.2 * attempt)
                        continue
                    if ranged:
                        self.ranged_resumes += 1
                    progress.set(label, done=size, state="downloaded")
                    return
            finally:
                self.busy_partials.discard(digest)

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
        pinned = self.store.pin(record.manifest_digest, *(d for d, _, _ in blobs))
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
            self.store.unpin(pinned)
        log.info("pushed %s as %s", record.id, dest)
        return json.dumps(
            {"reference": str(dest), "digest": record.manifest_digest, "id": record.id}
        )

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

    def replay(self, job: Job) -> None:
        for label, values in self.items.items():
            with contextlib.suppress(Exception):
                job.progress(label, **values)
