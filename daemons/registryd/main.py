"""Entry point and bus object of zlayer-registryd.

The bus members translate between D-Bus and :class:`~daemons.registryd.store.ImageStore`,
which does the work in a thread so that a long import never stalls the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import Counter, Gauge
from sdbus import dbus_method_async_override

from daemons.registryd import wasm
from daemons.registryd.auth import CredentialStore
from daemons.registryd.client import RegistryClient, parse_user_reference
from daemons.registryd.received import ReceivedFiles
from daemons.registryd.settings import RegistrySettings
from daemons.registryd.store import ImageStore, StoreError
from shared.bus import (
    DAEMONS_BY_NAME,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    Registry1,
    UnavailableError,
    ZLayerError,
)
from shared.clients import AgentClient
from shared.config import DaemonSettings
from shared.daemon import Daemon, daemon_members, main_for
from shared.jobs import Job, JobTable
from shared.paths import Paths
from shared.reference import InvalidReferenceError, normalize_reference
from shared.wasm_artifact import build_artifact, read_binary
from shared.wire import encode
from shared.wire.jobs import JobInfo
from shared.wire.registry import ImageInfo, ImageRootfs, PruneResult

if TYPE_CHECKING:
    from daemons.registryd.build.builder import Builder

PULL_POLICIES = ("always", "newer", "if_not_present", "never")
ACTIVE_REPLICA_STATES = ("creating", "initializing", "running", "restarting", "stopping")
AGENT_TIMEOUT = 3.0

IMAGES = Gauge("zlayer_registry_images", "Images stored on this node.")
BLOB_BYTES = Gauge("zlayer_registry_blob_bytes", "Bytes of blobs (manifests, configs, layers).")
LAYERS = Gauge("zlayer_registry_unpacked_layers", "Layers unpacked for overlayfs.")
IMPORTS = Counter("zlayer_registry_imports", "Image imports, by result.", ["result"])
BUILDS = Counter("zlayer_registry_builds", "Image builds, by result.", ["result"])
PULLS = Counter("zlayer_registry_pulls", "Registry pulls, by result.", ["result"])

T = TypeVar("T")


class RegistryService(Registry1):
    version, status = daemon_members()

    def __init__(self, daemon: RegistryDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    @dbus_method_async_override()
    async def import_image(self, path: str, name: str) -> str:
        try:
            async with self.daemon.received.using(path):
                images = await self.daemon.work(self.daemon.store.import_path, path, name)
        except BaseException:
            IMPORTS.labels(result="failed").inc()
            raise
        IMPORTS.labels(result="ok").inc()
        await self.daemon.update_metrics()
        for image in images:
            self.daemon.log.info("imported %s as %s", image.id, ", ".join(image.names) or "-")
        return encode(images[0])

    @dbus_method_async_override()
    async def path_visible(self, path: str, device: int, inode: int) -> bool:
        return await self.daemon.work(ReceivedFiles.visible, path, device, inode)

    @dbus_method_async_override()
    async def receive(self, fd: int) -> str:
        path = await self.daemon.work(self.daemon.received.receive, fd)
        return path

    @dbus_method_async_override()
    async def list_images(self) -> str:
        images = await self.daemon.work(self.daemon.store.list_images)
        return encode(images)

    @dbus_method_async_override()
    async def inspect_image(self, reference: str) -> str:
        detail = await self.daemon.work(self.daemon.store.detail, reference)
        return encode(detail)

    @dbus_method_async_override()
    async def remove_image(self, reference: str, force: bool) -> list[str]:
        record, _ = await self.daemon.work(self.daemon.store.resolve, reference)
        if not force:
            users = await self.daemon.replicas_using(record.names)
            if users:
                raise ConflictError(
                    f"image {reference} is used by {len(users)} replicas ({', '.join(users[:3])}"
                    f"{', ...' if len(users) > 3 else ''}); stop them first, or use --force"
                )
        removed = await self.daemon.work(self.daemon.store.remove, reference, force)
        await self.daemon.update_metrics()
        self.daemon.log.info("removed %s", ", ".join(removed))
        return removed

    @dbus_method_async_override()
    async def ensure_image(self, reference: str, pull_policy: str) -> str:
        if pull_policy and pull_policy not in PULL_POLICIES:
            raise InvalidArgumentError(
                f"pull policy {pull_policy!r} is not one of {', '.join(PULL_POLICIES)}"
            )
        rootfs = await self.daemon.ensure(reference, pull_policy or "if_not_present")
        await self.daemon.update_metrics()
        return encode(rootfs)

    @dbus_method_async_override()
    async def ensure_image_job(self, reference: str, pull_policy: str) -> tuple[int, str]:
        if pull_policy and pull_policy not in PULL_POLICIES:
            raise InvalidArgumentError(
                f"pull policy {pull_policy!r} is not one of {', '.join(PULL_POLICIES)}"
            )
        policy = pull_policy or "if_not_present"
        # The usual case, an image already here, answers in this one call.
        rootfs = await self.daemon.ensure_local(reference, policy)
        if rootfs is not None:
            return 0, encode(rootfs)

        async def work(job: Job) -> str:
            pulled = await self.daemon.ensure(reference, policy, job)
            await self.daemon.update_metrics()
            return encode(pulled)

        return self.daemon.jobs.start("ensure-image", reference, work), ""

    # --- jobs (shared/jobs.py)

    @dbus_method_async_override()
    async def get_job(self, job_id: int) -> str:
        return encode(self.daemon.jobs.require(job_id, "zlayer-registryd"))

    @dbus_method_async_override()
    async def list_jobs(self) -> str:
        return encode(self.daemon.jobs.list())

    @dbus_method_async_override()
    async def cancel_job(self, job_id: int) -> None:
        self.daemon.jobs.cancel_running(job_id)

    # --- registry client (pull, push, login): below this line

    @dbus_method_async_override()
    async def pull(self, reference: str, pull_policy: str, auth: str) -> int:
        if pull_policy and pull_policy not in PULL_POLICIES:
            raise InvalidArgumentError(
                f"pull policy {pull_policy!r} is not one of {', '.join(PULL_POLICIES)}"
            )
        self.daemon.check_store()
        ref = parse_user_reference(reference)
        policy = pull_policy or "always"
        client = self.daemon.registry

        async def work(job: Job) -> str:
            if policy in ("never", "if_not_present"):
                found = await self.daemon.work(self.daemon.store.find, str(ref))
                if found is not None:
                    return encode(found[0].info())
                if policy == "never":
                    raise NotFoundError(
                        f"image {ref} is not on this node and the pull policy is never"
                    )
            try:
                result = await client.pull_job(job, str(ref), auth)
            except BaseException:
                PULLS.labels(result="failed").inc()
                raise
            PULLS.labels(result="ok").inc()
            await self.daemon.update_metrics()
            return result

        return self.daemon.jobs.start("pull", str(ref), work)

    @dbus_method_async_override()
    async def push(self, reference: str, destination: str, auth: str) -> int:
        self.daemon.check_store()
        await self.daemon.work(self.daemon.store.resolve, reference)
        if destination:
            parse_user_reference(destination)
        client = self.daemon.registry

        async def work(job: Job) -> str:
            return await client.push_job(job, reference, destination, auth)

        return self.daemon.jobs.start("push", destination or reference, work)

    @dbus_method_async_override()
    async def login(self, registry: str, username: str, password: str) -> str:
        host = await self.daemon.registry.login(registry, username, password)
        self.daemon.log.info("logged in to %s as %s", host, username)
        return host

    @dbus_method_async_override()
    async def logout(self, registry: str) -> bool:
        return await self.daemon.registry.logout(registry)

    @dbus_method_async_override()
    async def prune(self) -> str:
        in_use = await self.daemon.images_in_use()
        _, before, _ = await self.daemon.work(self.daemon.store.stats)
        images, blobs = await self.daemon.work(
            self.daemon.store.prune, in_use, set(self.daemon.registry.busy_partials)
        )
        _, after, _ = await self.daemon.work(self.daemon.store.stats)
        await self.daemon.update_metrics()
        self.daemon.log.info("pruned %d images and %d blobs", len(images), len(blobs))
        return encode(PruneResult(images=images, blobs=blobs, bytes=max(before - after, 0)))

    @dbus_method_async_override()
    async def export_image(self, reference: str, fd: int, gzip: bool) -> int:
        try:
            self.daemon.check_store()
            await self.daemon.work(self.daemon.store.resolve, reference)
        except BaseException:
            os.close(fd)
            raise
        out = os.fdopen(fd, "wb")

        async def work(job: Job) -> str:
            job.progress("archive", state="writing")
            try:
                info = await self.daemon.work(self.daemon.store.export, reference, out, gzip)
            finally:
                # The descriptor is ours: the caller waits for EOF-free completion via the job.
                await asyncio.to_thread(out.close)
            job.progress("archive", state="done")
            return encode(info)

        return self.daemon.jobs.start("export", reference, work)

    # --- builds: below this line

    @dbus_method_async_override()
    async def build(self, request: str) -> int:
        try:
            job_id = await self.daemon.builder.start(request)
        except BaseException:
            BUILDS.labels(result="refused").inc()
            raise
        self.daemon.log.info("build job %d started", job_id)
        return job_id

    # --- wasm artifacts: below this line

    @dbus_method_async_override()
    async def push_wasm(self, path: str, reference: str, auth: str, tls_verify: bool) -> int:
        # Checked before the job starts, so a bad file or name fails the call itself.
        async with self.daemon.received.using(path):
            data = await self.daemon.work(read_binary, path)
        artifact = await self.daemon.work(build_artifact, data, path, reference)
        store = self.daemon.store
        return self.daemon.jobs.start(
            "push",
            artifact.name,
            lambda job: wasm.push_job(
                job, artifact, store.tmp_dir, self.daemon.registry, auth, tls_verify
            ),
        )


class RegistryDaemon(Daemon):
    info = DAEMONS_BY_NAME["registryd"]
    settings_class = RegistrySettings

    def __init__(self, settings: DaemonSettings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.store = ImageStore(paths.daemon_state(self.info.name))
        registry_settings = (
            settings if isinstance(settings, RegistrySettings) else RegistrySettings()
        )
        self.store.max_unpacked = registry_settings.max_layer_unpacked_size
        self.registry = RegistryClient(
            self.store,
            registry_settings,
            CredentialStore(paths.daemon_state(self.info.name) / "auth.json"),
            self.work,
        )
        self.store_problem = ""
        self.received = ReceivedFiles(paths.daemon_state(self.info.name) / "received")
        self.jobs = JobTable(self._job_removed, self._job_new)
        self.service: RegistryService | None = None

    @functools.cached_property
    def builder(self) -> Builder:
        """Builds: buildah under the state dir, results imported into the store.

        Made with the first build: the build formats and the spec models it
        loads are not held by an idle registryd.
        """
        from daemons.registryd.build.builder import Builder

        return Builder(
            self.paths.daemon_state(self.info.name),
            self.jobs,
            self._import_built,
            self.received,
            self.log,
        )

    def make_service(self) -> RegistryService:
        self.service = RegistryService(self)
        if self.bus is not None:
            self.jobs.attach(self.bus, self.info.object_path)
        return self.service

    async def stop(self) -> None:
        await self.jobs.close()
        await self.registry.close()

    def _job_new(self, info: JobInfo, path: str) -> None:
        if self.service is not None and path:
            self.service.job_new.emit((info.id, path, info.kind))

    def _job_removed(self, info: JobInfo, path: str) -> None:
        if self.service is not None:
            # JobRemoved's path is an object path: "/" when the job was never exported.
            self.service.job_removed.emit((info.id, path or "/", encode(info)))
        if info.kind == "build":
            BUILDS.labels(result=info.state).inc()

    def _stored(self, info: ImageInfo) -> None:
        """The store kept an image (import, pull, build): ImageStored, from the loop's thread."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: registryd is stopping
            self.loop.call_soon_threadsafe(self._emit_stored, info)

    def _emit_stored(self, info: ImageInfo) -> None:
        if self.service is not None:
            self.service.image_stored.emit(encode(info))

    async def _import_built(self, path: str, name: str) -> list[ImageInfo]:
        """builds: store a finished build's OCI layout under ``name``."""
        images = await self.work(self.store.import_path, path, name)
        await self.update_metrics()
        return images

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.store.on_stored = self._stored
        try:
            await asyncio.to_thread(self.received.reset)
            await asyncio.to_thread(self.store.open)
        except (StoreError, OSError) as exc:
            self.store_problem = str(exc)
            self.state = "degraded"
            self.detail = self.store_problem
            self.log.error("%s", exc)
            return
        await self.update_metrics()
        images = len(self.store.images)
        self.detail = f"{images} image{'s' if images != 1 else ''}"

    def check_store(self) -> None:
        if self.store_problem:
            raise UnavailableError(f"the image store cannot be used: {self.store_problem}")

    async def ensure(self, reference: str, policy: str, job: Job | None = None) -> ImageRootfs:
        """The image's unpacked layers, pulled first as ``policy`` says.

        never: only what is here. if_not_present: pull when missing. always:
        ask the registry every time (the blobs already here are not fetched
        again). newer: like always, but a registry that cannot be reached
        leaves the image here in use. ``job`` gets the pull's progress, and
        cancelling it cancels the pull.
        """
        rootfs = await self.ensure_local(reference, policy)
        if rootfs is not None:
            return rootfs
        task, progress = self.registry.pull_task(reference, "")
        if job is not None:
            progress.jobs.append(job)
            progress.replay(job)
        try:
            # Without a job the pull outlives a caller that gave up (it may come back).
            info = await (task if job is not None else asyncio.shield(task))
        except UnavailableError as exc:
            rootfs = await self.work(self.store.rootfs, reference)
            if rootfs is None:
                raise UnavailableError(
                    f"cannot pull {normalize_reference(reference)}: {exc.args[0]}; it is not "
                    "on this node either: import it with `zlayerctl image import PATH`, or fix "
                    "the registry and deploy again"
                ) from None
            if policy != "newer":
                raise
            self.log.warning("using the local %s: %s", reference, exc.args[0])
            return rootfs
        PULLS.labels(result="ok").inc()
        rootfs = await self.work(self.store.rootfs, info.id)
        if rootfs is None:
            raise UnavailableError(f"image {reference} was removed right after its pull")
        return rootfs

    async def ensure_local(self, reference: str, policy: str) -> ImageRootfs | None:
        """What ``ensure`` answers without a pull: the image here when ``policy`` takes
        it as it is (or ``reference`` is an image id), its errors; None when it pulls."""
        if policy in ("never", "if_not_present"):
            rootfs = await self.work(self.store.rootfs, reference)
            if rootfs is not None:
                return rootfs
            if policy == "never":
                try:
                    shown = normalize_reference(reference)
                except InvalidReferenceError as exc:
                    raise InvalidArgumentError(str(exc)) from None
                raise NotFoundError(
                    f"image {shown} is not on this node and its pull policy is never; "
                    "pull it with `zlayerctl pull` or import it with `zlayerctl image import`"
                )
        try:
            normalize_reference(reference)
        except InvalidReferenceError as exc:
            rootfs = await self.work(self.store.rootfs, reference)
            if rootfs is not None:  # an image id: nothing to pull
                return rootfs
            raise InvalidArgumentError(str(exc)) from None
        return None

    async def images_in_use(self) -> set[str]:
        """Ids of the images agentd's replicas were made from; prune must know them all."""
        if self.bus is None:
            raise UnavailableError("zlayer-registryd is not on the bus")
        try:
            replicas = await asyncio.wait_for(AgentClient(self.bus).list_replicas(), AGENT_TIMEOUT)
        except Exception as exc:  # without agentd's answer, no image can be called unused
            self.log.debug("cannot ask agentd which replicas use images: %s", exc)
            raise UnavailableError(
                "cannot tell which images replicas use: zlayer-agentd does not answer; "
                "start it (`zlayerctl status` shows it) and prune again"
            ) from None
        used: set[str] = set()
        for replica in replicas:
            try:
                found = await self.work(self.store.find, replica.image)
            except ZLayerError:
                continue
            if found is not None:
                used.add(found[0].id)
        return used

    async def work(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call in a thread; any failure becomes a sentence."""
        if self.store_problem:
            raise UnavailableError(f"the image store cannot be used: {self.store_problem}")
        try:
            return await asyncio.to_thread(function, *args)
        except ZLayerError:
            raise
        except OSError as exc:
            self.log.exception("store operation failed")
            where = f" ({exc.filename})" if exc.filename else ""
            raise ZLayerError(f"the image store failed: {exc.strerror or exc}{where}") from None
        except Exception as exc:
            self.log.exception("store operation failed")
            raise ZLayerError(f"the image store failed unexpectedly: {exc}") from None

    async def update_metrics(self) -> None:
        images, blob_bytes, layers = await asyncio.to_thread(self.store.stats)
        IMAGES.set(images)
        BLOB_BYTES.set(blob_bytes)
        LAYERS.set(layers)
        self.detail = f"{images} image{'s' if images != 1 else ''}"

    async def replicas_using(self, names: list[str]) -> list[str]:
        """Replicas agentd runs from one of ``names``; empty when agentd does not answer."""
        if not names or self.bus is None:
            return []
        try:
            replicas = await asyncio.wait_for(AgentClient(self.bus).list_replicas(), AGENT_TIMEOUT)
        except Exception as exc:  # agentd down or older: removal must still work
            self.log.debug("cannot ask agentd which replicas use an image: %s", exc)
            return []
        wanted = set(names)
        users = []
        for replica in replicas:
            try:
                image = normalize_reference(replica.image)
            except InvalidReferenceError:
                continue
            if image in wanted and replica.state in ACTIVE_REPLICA_STATES:
                users.append(replica.id)
        return users


def main() -> None:
    main_for(RegistryDaemon)
