"""Entry point and bus object of zlayer-registryd.

The bus members translate between D-Bus and :class:`~daemons.registryd.store.ImageStore`,
which does the work in a thread so that a long import never stalls the bus.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge
from sdbus import dbus_method_async_override

from daemons.registryd import wasm
from daemons.registryd.store import ImageStore, StoreError
from shared.bus import (
    DAEMONS_BY_NAME,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    Registry1,
    UnavailableError,
    ZLayerError,
    proxy,
)
from shared.config import DaemonSettings
from shared.daemon import Daemon, daemon_members, main_for
from shared.jobs import JobTable
from shared.models import ReplicaInfo
from shared.paths import Paths
from shared.reference import InvalidReferenceError, normalize_reference

PULL_POLICIES = ("always", "newer", "if_not_present", "never")
ACTIVE_REPLICA_STATES = ("creating", "initializing", "running", "restarting", "stopping")
AGENT_TIMEOUT = 3.0

IMAGES = Gauge("zlayer_registry_images", "Images stored on this node.")
BLOB_BYTES = Gauge("zlayer_registry_blob_bytes", "Bytes of blobs (manifests, configs, layers).")
LAYERS = Gauge("zlayer_registry_unpacked_layers", "Layers unpacked for overlayfs.")
IMPORTS = Counter("zlayer_registry_imports", "Image imports, by result.", ["result"])

T = TypeVar("T")


class RegistryService(Registry1):
    version, status = daemon_members()

    def __init__(self, daemon: RegistryDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    @dbus_method_async_override()
    async def import_image(self, path: str, name: str) -> str:
        try:
            images = await self.daemon.work(self.daemon.store.import_path, path, name)
        except BaseException:
            IMPORTS.labels(result="failed").inc()
            raise
        IMPORTS.labels(result="ok").inc()
        await self.daemon.update_metrics()
        for image in images:
            self.daemon.log.info("imported %s as %s", image.id, ", ".join(image.names) or "-")
        return images[0].model_dump_json()

    @dbus_method_async_override()
    async def list_images(self) -> str:
        images = await self.daemon.work(self.daemon.store.list_images)
        return json.dumps([image.model_dump(mode="json") for image in images])

    @dbus_method_async_override()
    async def inspect_image(self, reference: str) -> str:
        detail = await self.daemon.work(self.daemon.store.detail, reference)
        return detail.model_dump_json()

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
        rootfs = await self.daemon.work(self.daemon.store.rootfs, reference)
        if rootfs is None:
            try:
                shown = normalize_reference(reference)
            except InvalidReferenceError as exc:
                raise InvalidArgumentError(str(exc)) from None
            raise NotFoundError(
                f"image {shown} is not on this node; import it with `zlayerctl image import PATH` "
                "(registry pulls are not available yet)"
            )
        await self.daemon.update_metrics()
        return rootfs.model_dump_json()

    # --- jobs (shared/jobs.py)

    @dbus_method_async_override()
    async def get_job(self, job_id: int) -> str:
        info = self.daemon.jobs.get(job_id)
        if info is None:
            raise NotFoundError(
                f"job {job_id} is not known to zlayer-registryd (it ended long ago, "
                "or the daemon restarted since)"
            )
        return info.model_dump_json()

    @dbus_method_async_override()
    async def list_jobs(self) -> str:
        return json.dumps([info.model_dump(mode="json") for info in self.daemon.jobs.list()])

    @dbus_method_async_override()
    async def cancel_job(self, job_id: int) -> None:
        if not self.daemon.jobs.cancel(job_id):
            raise NotFoundError(f"job {job_id} is not running")

    # --- registry client (pull, push, login): below this line

    # --- builds: below this line

    # --- wasm artifacts: below this line

    @dbus_method_async_override()
    async def export_wasm(self, path: str, name: str, output: str, author: str) -> str:
        artifact = await self.daemon.work(wasm.export_layout, path, name, output, author)
        self.daemon.log.info("exported %s as %s to %s", path, artifact.name, output)
        return artifact.model_dump_json()

    @dbus_method_async_override()
    async def push_wasm(self, path: str, reference: str, auth: str, tls_verify: bool) -> int:
        # Checked before the job starts, so a bad file or name fails the call itself.
        data = await self.daemon.work(wasm.read_binary, path)
        artifact = await self.daemon.work(wasm.build_artifact, data, path, reference)
        store = self.daemon.store
        return self.daemon.jobs.start(
            "push",
            artifact.name,
            lambda job: wasm.push_job(
                job, artifact, store.tmp_dir, store.root / "auth.json", auth, tls_verify
            ),
        )


class RegistryDaemon(Daemon):
    info = DAEMONS_BY_NAME["registryd"]

    def __init__(self, settings: DaemonSettings, paths: Paths) -> None:
        super().__init__(settings, paths)
        self.store = ImageStore(paths.daemon_state(self.info.name))
        self.store_problem = ""
        self.jobs = JobTable(self._job_removed)
        self.service: RegistryService | None = None

    def make_service(self) -> RegistryService:
        self.service = RegistryService(self)
        return self.service

    async def stop(self) -> None:
        await self.jobs.close()

    def _job_removed(self, job_id: int, info: str) -> None:
        if self.service is not None:
            self.service.job_removed.emit((job_id, info))

    async def start(self) -> None:
        try:
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
            agent = proxy(DAEMONS_BY_NAME["agentd"], self.bus)
            raw = await asyncio.wait_for(agent.list_replicas("", ""), AGENT_TIMEOUT)
            replicas = [ReplicaInfo.model_validate(r) for r in json.loads(raw)]
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
