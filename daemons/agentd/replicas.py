"""This node's replicas: keeping each assigned service at its replica count.

schedd assigns services (``ApplyService``); for each replica this module runs
one lifecycle task: image from registryd, network from overlayd, init steps,
start through the container runtime, health checks, and on exit the restart
policy with exponential backoff. Every replica's record is persisted in
agentd's state directory, so a restarted agentd adopts the containers conmon
kept running and learns the exit codes of those that ended while it was down.

The runtime sits behind :class:`Launcher`, so this module decides *when*
and *why*; the runtime knows *how*.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec
from prometheus_client import Counter

from daemons.agentd import probes, wasm
from daemons.agentd.errors import ContainerError, SpecRefused
from shared.bus import NotFoundError, ZLayerError
from shared.statefile import read_state, write_atomically
from shared.views import HeldGeneration
from shared.wire import decode, encode
from shared.wire.agent import (
    HealthState,
    JobRun,
    JobTrigger,
    NodeAssignments,
    ReplicaInfo,
    ReplicaState,
    ReplicaType,
    ServiceAssignment,
    SyncResult,
)
from shared.wire.overlay import Attachment
from shared.wire.registry import ImageRootfs

if TYPE_CHECKING:
    from shared.spec import ServiceSpec

log = logging.getLogger("zlayer.agentd")

GARBAGE = Counter(
    "zlayer_agent_garbage_removed",
    "Containers and network attachments removed because no replica owned them.",
    ["kind"],
)
RESTARTS = Counter(
    "zlayer_agent_replica_restarts",
    "Replicas started again after they ended or failed to start, by service.",
    ["deployment", "service"],
)
HEALTH_FAILURES = Counter(
    "zlayer_agent_health_check_failures",
    "Replicas found unhealthy by their health check, by service.",
    ["deployment", "service"],
)

BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
STABLE_RUN = 30.0  # a replica that ran this long starts its backoff afresh
DEFAULT_GRACE = 10.0
JOB_RUNS_KEPT = 20


class Launcher(Protocol):
    """What the replica lifecycle needs from the container runtime."""

    async def start(
        self,
        container_id: str,
        service: ServiceSpec,
        rootfs: ImageRootfs,
        attachment: Attachment | None,
        args: list[str] | None,
        before_start: Awaitable[object] | None = None,
    ) -> int:
        """Create and start a container; return its pid. ``args`` overrides the command.
        ``before_start`` is awaited between the create and the start (the rest of a
        reserved network, the records on disk); its failure removes the container.
        """

    async def wait(self, container_id: str) -> tuple[int, bool]:
        """Until the container ends: (exit code, OOM-killed)."""

    async def running_pid(self, container_id: str) -> int | None:
        """The pid of a running container, None when it is not running."""

    async def stop(self, container_id: str, signal: str, grace: float) -> None:
        """Signal, wait up to ``grace`` seconds, then KILL."""

    async def remove(self, container_id: str) -> None:
        """Delete the container and its file system (named volumes stay)."""

    async def exec(
        self, container_id: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int:
        """Run ``argv`` inside the container; its exit code."""

    def log_paths(self, container_id: str) -> list[str]:
        """Log files, oldest first."""

    async def container_ids(self) -> list[str]:
        """Every container this node's runtime root holds, running or not."""


class Neighbours(Protocol):
    """The other daemons a replica needs."""

    async def ensure_image(
        self,
        reference: str,
        pull_policy: str,
        on_progress: Callable[[str], None] | None = None,
    ) -> ImageRootfs:
        """The image's root file system, pulled first if need be; ``on_progress``
        gets a sentence on how a pull goes."""
        ...

    async def reserve(self, container_id: str, hostname: str) -> Attachment:
        """The address and the empty namespace; ``attach`` makes the rest."""
        ...

    async def attach(self, container_id: str, hostname: str) -> Attachment: ...

    async def detach(self, container_id: str) -> None: ...

    async def attached(self) -> list[str]:
        """The container ids that hold an attachment on the node network."""
        ...


class ReplicaRecord(msgspec.Struct, kw_only=True):
    """A replica as persisted; the bus sees it as ReplicaInfo.

    agentd's own file, not a bus value: the lifecycle changes it in place,
    and fields it does not know (from another version) are ignored.
    """

    id: str
    deployment: str
    service: str
    instance: int
    revision: int
    rtype: ReplicaType = "service"
    image: str
    state: ReplicaState = "creating"
    health: HealthState = "none"
    pid: int = 0
    address: str = ""
    exit_code: int | None = None
    oom_killed: bool = False
    restarts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    message: str = ""
    job_run: str | None = None
    trigger: JobTrigger | Literal[""] = ""
    # Failed because its spec can never run here: left alone until a deploy.
    refused: bool = False

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            id=self.id,
            deployment=self.deployment,
            service=self.service,
            instance=self.instance,
            revision=self.revision,
            rtype=self.rtype,
            image=self.image,
            state=self.state,
            health=self.health,
            pid=self.pid,
            address=self.address,
            exit_code=self.exit_code,
            oom_killed=self.oom_killed,
            restarts=self.restarts,
            started_at=self.started_at,
            finished_at=self.finished_at,
            message=self.message,
            refused=self.refused,
        )


@dataclass
class Replica:
    record: ReplicaRecord
    spec: ServiceSpec
    task: asyncio.Task[None] | None = None
    restart_requested: str = ""
    stopping: bool = False
    # Set while the replica is being stopped and removed in the background.
    removal: asyncio.Task[None] | None = None
    removed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by a deploy: a replica waiting out a backoff tries again at once.
    retry_now: asyncio.Event = field(default_factory=asyncio.Event)


class RestartDecision:
    """Whether and when a replica that ended starts again."""

    @staticmethod
    def should_restart(spec: ServiceSpec, exit_code: int, attempts: int, unhealthy: bool) -> bool:
        policy = spec.restart_policy
        if policy is not None:
            if policy.max_attempts is not None and attempts >= policy.max_attempts:
                return False
            if policy.kind == "no":
                return unhealthy and spec.rtype == "service"
            if policy.kind == "on_failure":
                return exit_code != 0 or unhealthy
            return True
        if spec.rtype != "service":
            return False  # a job run is done when it ends
        return spec.errors.on_panic.action == "restart"

    @staticmethod
    def delay(spec: ServiceSpec, attempts: int) -> float:
        base = BACKOFF_BASE
        if spec.restart_policy is not None and spec.restart_policy.delay is not None:
            base = spec.restart_policy.delay.total_seconds()
        return float(min(base * 2 ** max(0, attempts - 1), BACKOFF_MAX))


def container_id(deployment: str, service: str, instance: int, revision: int) -> str:
    return f"{deployment}-{service}-{instance}-r{revision}"


class Node:
    """Every assignment and replica on this node."""

    def __init__(
        self,
        state_dir: Path,
        launcher: Launcher,
        neighbours: Neighbours,
        changed: Callable[[ReplicaInfo], None],
        *,
        in_cluster: bool = False,
    ) -> None:
        self.state_dir = state_dir
        self.assign_dir = state_dir / "assignments"
        self.record_dir = state_dir / "replicas"
        self.runs_dir = state_dir / "job-runs"
        for directory in (self.assign_dir, self.record_dir, self.runs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.launcher = launcher
        self.neighbours = neighbours
        self.changed = changed
        self.assignments: dict[tuple[str, str], ServiceAssignment] = {}
        self.replicas: dict[str, Replica] = {}
        self.held = HeldGeneration(state_dir)
        # What was removed as garbage since schedd last asked, for its events.
        self.removed_notes: list[tuple[str, str]] = []
        self._collecting: dict[str, asyncio.Task[None]] = {}  # ids being removed as garbage
        self._lock = asyncio.Lock()
        # A state file's next content (None: remove the file), by path, and the one
        # task per file that writes it off the event loop: one write of a file at a
        # time, so an older content never lands over a newer one. Replica records and
        # assignments go this way.
        self._pending: dict[Path, tuple[str | None, bool]] = {}  # (content, fsynced)
        self._writers: dict[Path, asyncio.Task[None]] = {}
        self._write_errors: dict[Path, OSError] = {}  # the last write of a file that failed
        self._background: set[asyncio.Task[None]] = set()  # clean-ups nobody waits for
        # Each job service's runs, newest first (its runs file's content), read by load().
        self._runs: dict[tuple[str, str], list[JobRun]] = {}
        # Nothing that changes replicas runs before the containers that are
        # there have been adopted: a start of an id that runs would fail and
        # its clean-up would kill the running container.
        self.loaded = asyncio.Event()
        # In a cluster, what this node kept from before it stopped may have moved to
        # another node while it was down (its lease lapsed): nothing is started from it
        # (a replica whose container ended, an instance missing) until schedd's first
        # complete view says what is still placed here (an ApplyService before it carries
        # schedd's placements of its service, and is followed). A lone node's schedd is this
        # node's only source of placements, so its kept assignments stand.
        self.awaiting_view = in_cluster
        # adopted, not running, not started again until that view (or, on a lone node,
        # until converged); with whether its container was made (False: agentd stopped
        # while it started it)
        self._held_back: list[tuple[Replica, bool]] = []

    # ------------------------------------------------------------ persistence

    def _save(self, replica: Replica) -> None:
        self._queue_record(replica.record.id, encode(replica.record))

    def _record_path(self, replica_id: str) -> Path:
        return self.record_dir / f"{replica_id}.json"

    def _queue_record(self, replica_id: str, text: str | None) -> asyncio.Task[None]:
        """Have a replica's record file written (``text``) or removed (None), in call order."""
        return self._queue_file(self._record_path(replica_id), text)

    def _queue_file(
        self, path: Path, text: str | None, durable: bool = False
    ) -> asyncio.Task[None]:
        """Have a state file written (``text``, fsynced if ``durable``) or removed (None),
        in call order.

        Only the newest content waiting matters: a write still under way is
        followed by the last one asked for since, never by each in between.
        """
        self._pending[path] = (text, durable)
        writer = self._writers.get(path)
        if writer is None:
            writer = asyncio.create_task(self._write_file(path), name=f"write-{path.name}")
            self._writers[path] = writer
        return writer

    async def _write_file(self, path: Path) -> None:
        try:
            while path in self._pending:
                text, durable = self._pending.pop(path)
                try:
                    if text is None:
                        await asyncio.to_thread(path.unlink, missing_ok=True)
                    else:
                        # Records and assignments are not fsynced: a record says what runs
                        # here, and a power cut stops it all; load() takes what is left,
                        # and schedd sends its complete view (the assignments) again when
                        # agentd starts. A job's runs are its history: fsynced.
                        await asyncio.to_thread(write_atomically, path, text, durable=durable)
                    self._write_errors.pop(path, None)
                except OSError as exc:
                    log.error("could not write %s: %s", path, exc)
                    self._write_errors[path] = exc
        finally:
            # No await between the last look at the pending content and this: a
            # write asked for after it starts a new writer.
            del self._writers[path]

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """``work`` in the background, kept referenced until it ends."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _file_written(self, path: Path) -> None:
        """Wait until what was asked for a state file is on disk."""
        writer = self._writers.get(path)
        if writer is not None:
            # Shielded: a caller cancelled must not cut the writes short.
            await asyncio.shield(writer)

    async def _records_written(self, replica_id: str) -> None:
        """Wait until what was asked for a replica's record file is on disk; ContainerError
        (one sentence) when the last write of it failed: a replica does not start with no
        record a restarted agentd could adopt it by."""
        path = self._record_path(replica_id)
        await self._file_written(path)
        failed = self._write_errors.get(path)
        if failed is not None:
            raise ContainerError(
                f"its record could not be written ({failed.strerror or failed}); "
                f"free space under {self.record_dir.parent} or fix its permissions"
            )

    async def _remove_record(self, replica_id: str) -> None:
        """Remove a replica's record file, after the writes asked for before."""
        self._queue_record(replica_id, None)
        await self._records_written(replica_id)

    def _update(self, replica: Replica, **changes: Any) -> None:
        record = replica.record
        before = (record.state, record.health, record.message)
        for key, value in changes.items():
            setattr(record, key, value)
        # Told first, and the record written in a thread: the rename over the old one
        # can wait on the disk (ext4 flushes a file renamed over another), about 10 ms
        # under load, and nobody reads the file but agentd's next start, which checks
        # what runs anyway.
        if (record.state, record.health, record.message) != before:
            self.changed(record.info())
        self._save(replica)

    async def load(self) -> None:
        """Read assignments and records; adopt the containers that still exist.

        Replicas whose service is no longer assigned, and containers no record
        names, are removed (with a grace period) as garbage.
        """
        async with self._lock:
            try:
                await self._load()
                # Before any request: a replica of the same id waits for its removal.
                await self._collect_containers()
            finally:
                self.loaded.set()
        await self._collect_attachments()

    async def _load(self) -> None:
        self._runs = await asyncio.to_thread(self._read_runs)
        for path in sorted(self.assign_dir.glob("*.json")):
            assignment = read_state(
                path,
                lambda text: decode(text, ServiceAssignment),
                "until schedd sends it again",
                log,
            )
            if assignment is not None:
                self.assignments[(assignment.deployment, assignment.service)] = assignment
        orphans: list[Replica] = []
        made: set[str] | None = None  # the containers with a bundle, listed when needed
        for path in sorted(self.record_dir.glob("*.json")):
            record = read_state(
                path,
                lambda text: decode(text, ReplicaRecord),
                "its container, if any, is removed as garbage",
                log,
            )
            if record is None:
                continue
            # pydantic and the spec models only once there is a replica
            from shared.spec import ServiceSpec

            owner = self.assignments.get((record.deployment, record.service))
            if owner is None:
                spec = ServiceSpec.model_validate({"image": record.image})
                replica = Replica(record, spec)
                self.replicas[record.id] = replica
                orphans.append(replica)
                continue
            spec_json = next(
                (old.spec for old in owner.previous if old.revision == record.revision),
                owner.spec,
            )
            replica = Replica(record, ServiceSpec.model_validate(spec_json))
            self.replicas[record.id] = replica
            if record.state in ("stopped", "failed", "exited") and record.rtype != "service":
                continue
            if record.state == "stopped" or (record.state == "failed" and record.refused):
                continue
            pid = await self.launcher.running_pid(record.id)
            if made is None and not pid:
                made = set(await self.launcher.container_ids())
            # A container is adopted only once it was started: one left "created" (agentd
            # stopped while conmon created it) never ran, and its start is made again.
            container_made = (
                made is not None
                and record.id in made
                and record.state not in ("creating", "initializing")
            )
            if pid:
                log.info("adopting %s (running, pid %d)", record.id, pid)
                if record.state != "running" or record.pid != pid:
                    # It was starting when agentd stopped, and it started.
                    self._update(replica, state="running", pid=pid, message="")
            elif self.awaiting_view:
                log.info("%s does not run; it waits for schedd's placements", record.id)
                if record.state != "exited":
                    self._update(
                        replica,
                        state="exited",
                        pid=0,
                        exit_code=record.exit_code if container_made else None,
                        message="not running after zlayer-agentd stopped; "
                        "waits for schedd's placements for this node",
                    )
                self._held_back.append((replica, container_made))
                continue
            elif not container_made:
                # agentd stopped while it started the replica (its image pulling, its
                # network attaching) or removed it: no container to adopt. It is started
                # again below if its service still wants it.
                log.info(
                    "%s has no container that ran; it starts again if its service still wants it",
                    record.id,
                )
                self._held_back.append((replica, False))
                continue
            else:
                log.info("adopting %s (ended while agentd was down)", record.id)
            replica.task = asyncio.create_task(self._lifecycle(replica, adopt=True))
        for replica in orphans:
            self._note(
                replica.record.deployment,
                f"removing replica {replica.record.id}: "
                "its service is no longer assigned to this node",
            )
            self._remove_later(replica, DEFAULT_GRACE, "its service is no longer assigned")
        if self.awaiting_view:
            log.info("in a cluster: nothing starts before schedd's placements for this node")
            return
        for assignment in list(self.assignments.values()):
            await self._converge(assignment)
        self._release_held_back()  # what converging did not remove

    def _note(self, deployment: str, sentence: str) -> None:
        """Log a removal of garbage and keep it for schedd, which makes it an event."""
        log.info("%s", sentence)
        self.removed_notes.append((deployment, sentence))
        del self.removed_notes[:-100]  # schedd takes them every sync; never grow unbounded

    async def collect_garbage(self) -> None:
        """Remove containers and network attachments that no replica of this node owns.

        Containers are stopped with the default grace period, in the
        background; what was removed is logged and noted for schedd's events.
        """
        await self.loaded.wait()
        async with self._lock:
            await self._collect_containers()
        await self._collect_attachments()

    async def _collect_containers(self) -> None:
        live = set(self.replicas) | {f"{cid}-init" for cid in self.replicas}
        for cid in await self.launcher.container_ids():
            if cid in live or cid in self._collecting:
                continue
            task = asyncio.get_running_loop().create_task(self._remove_container(cid))
            self._collecting[cid] = task

    async def _collect_attachments(self) -> None:
        try:
            attached = await self.neighbours.attached()
        except Exception as exc:  # overlayd down: the next sweep looks again
            log.debug("cannot list network attachments: %s", exc)
            return
        for cid in attached:
            if cid in self.replicas or cid in self._collecting:
                continue
            try:
                await self.neighbours.detach(cid)
            except Exception as exc:
                log.warning("could not release the network of %s: %s", cid, exc)
                continue
            GARBAGE.labels(kind="attachment").inc()
            self._note(
                self._deployment_of(cid), f"released the network of {cid}: no replica uses it"
            )

    def _deployment_of(self, container_id: str) -> str:
        """The deployment a container id (<deployment>-<service>-...) belongs to, if known."""
        known = {d for d, _s in self.assignments} | {
            r.record.deployment for r in self.replicas.values()
        }
        owners = [d for d in known if container_id.startswith(f"{d}-")]
        return max(owners, key=len, default="")

    async def _remove_container(self, cid: str) -> None:
        try:
            if await self.launcher.running_pid(cid):
                await self.launcher.stop(cid, "SIGTERM", DEFAULT_GRACE)
            await self.launcher.remove(cid)
            with contextlib.suppress(Exception):
                await self.neighbours.detach(cid)
        except Exception as exc:
            log.error("could not remove container %s: %s", cid, exc)
            return
        finally:
            self._collecting.pop(cid, None)
        GARBAGE.labels(kind="container").inc()
        self._note(
            self._deployment_of(cid), f"removed container {cid}: no replica of this node owns it"
        )

    # ------------------------------------------------------------ assignments

    async def apply(self, assignment: ServiceAssignment) -> None:
        await self.loaded.wait()
        async with self._lock:
            self._assign(assignment)
            await self._converge(assignment)

    def _assign(self, assignment: ServiceAssignment) -> None:
        key = (assignment.deployment, assignment.service)
        before = self.assignments.get(key)
        self.assignments[key] = assignment
        if before is not None and before == assignment:
            return
        name = f"{assignment.deployment}--{assignment.service}.json"
        self._queue_file(self.assign_dir / name, encode(assignment))
        if before is not None and assignment.retry > before.retry:
            self._retry_failed(assignment)

    def _retry_failed(self, assignment: ServiceAssignment) -> None:
        """A deploy came: replicas that failed to start or wait out a backoff try again now."""
        for replica in self.replicas.values():
            record = replica.record
            if (record.deployment, record.service) != (assignment.deployment, assignment.service):
                continue
            if record.state not in ("failed", "restarting") or replica.removal is not None:
                continue
            if replica.task is None or replica.task.done():
                log.info("%s: starting it again after a deploy", record.id)
                replica.task = asyncio.create_task(self._lifecycle(replica, adopt=False))
            else:
                replica.retry_now.set()

    async def sync(self, view: NodeAssignments) -> SyncResult:
        """schedd's complete view: take every assignment, drop and clear what it no longer names."""
        await self.loaded.wait()
        async with self._lock:
            if not self.held.accepts(view.generation):
                log.info(
                    "ignored assignments of generation %d: generation %d is newer",
                    view.generation,
                    self.held.value,
                )
                return SyncResult(generation=self.held.value, accepted=False)
            named = {(a.deployment, a.service) for a in view.assignments}
            for key in [k for k in self.assignments if k not in named]:
                self._unassign(*key)
            for replica in list(self.replicas.values()):
                record = replica.record
                if (record.deployment, record.service) not in named and replica.removal is None:
                    self._remove_later(replica, _grace(replica.spec), "no longer assigned")
            for assignment in view.assignments:
                self._assign(assignment)
                await self._converge(assignment)
            if self.awaiting_view:
                self._release_held_back()
            await asyncio.to_thread(self.held.hold, view.generation)
        await self.collect_garbage()
        notes, self.removed_notes = self.removed_notes, []
        return SyncResult(generation=view.generation, accepted=True, removed=notes)

    def _release_held_back(self) -> None:
        """The replicas held back at load that are still wanted here (on a lone node once
        converged, in a cluster at schedd's first view) go through their ended run (a
        restart, by their policy), or start again if their container was never made; the
        others are being removed by now."""
        self.awaiting_view = False
        held, self._held_back = self._held_back, []
        for replica, container_made in held:
            # not removed meanwhile (a removal, a RemoveService, a fence of the node)
            live = self.replicas.get(replica.record.id) is replica and not replica.stopping
            if live and replica.removal is None and replica.task is None:
                if container_made:
                    log.info("adopting %s (ended while agentd was down)", replica.record.id)
                else:
                    log.info("starting %s again", replica.record.id)
                replica.task = asyncio.create_task(self._lifecycle(replica, adopt=container_made))

    def _unassign(self, deployment: str, service: str) -> None:
        """Forget an assignment and the job history of its service."""
        self._forget(deployment, service)
        log.info("%s of %s is no longer assigned to this node", service, deployment)

    def _forget(self, deployment: str, service: str) -> None:
        """Drop a service's assignment and job runs, and have their files and kept run
        logs removed, in order with the writes asked for before (none of it on the loop)."""
        self.assignments.pop((deployment, service), None)
        self._queue_file(self.assign_dir / f"{deployment}--{service}.json", None)
        self._runs.pop((deployment, service), None)
        self._queue_file(self._runs_file(deployment, service), None)
        pattern = f"{deployment}-{service}-run*.log"
        self._later(asyncio.to_thread(_remove_matching, self.run_logs_dir, pattern))

    async def _converge(self, assignment: ServiceAssignment) -> None:
        from shared.spec import ServiceSpec

        spec = ServiceSpec.model_validate(assignment.spec)
        # revision -> how many replicas of it may stay (instances 1..n)
        keep = {old.revision: old.replicas for old in assignment.previous}
        keep[assignment.revision] = assignment.replicas
        mine = [
            r
            for r in self.replicas.values()
            if r.record.deployment == assignment.deployment
            and r.record.service == assignment.service
            and r.record.rtype == "service"
        ]
        # In a cluster only the instances placed here run on this node.
        placed = set(assignment.instances)
        for replica in mine:
            allowed = keep.get(replica.record.revision, 0)
            if replica.record.instance > allowed or (
                placed and replica.record.instance not in placed
            ):
                grace = assignment.grace if assignment.grace is not None else _grace(replica.spec)
                self._remove_later(replica, grace, "no longer wanted")
        if spec.rtype != "service":
            return
        for revision_spec, revision, count in [
            (spec, assignment.revision, assignment.replicas),
            *(
                (ServiceSpec.model_validate(old.spec), old.revision, old.replicas)
                for old in assignment.previous
            ),
        ]:
            present = {
                r.record.instance
                for r in self.replicas.values()
                if r.record.deployment == assignment.deployment
                and r.record.service == assignment.service
                and r.record.revision == revision
                and r.record.rtype == "service"
            }
            for instance in range(1, count + 1):
                if instance not in present and (not placed or instance in placed):
                    self._create(assignment, revision_spec, instance, revision=revision)

    def _create(
        self,
        assignment: ServiceAssignment,
        spec: ServiceSpec,
        instance: int,
        job_run: str | None = None,
        trigger: JobTrigger | Literal[""] = "",
        revision: int | None = None,
    ) -> Replica:
        revision = assignment.revision if revision is None else revision
        cid = (
            f"{assignment.deployment}-{assignment.service}-{job_run}"
            if job_run
            else container_id(assignment.deployment, assignment.service, instance, revision)
        )
        existing = self.replicas.get(cid)
        if existing is not None:  # pragma: no cover - callers look first; never two lifecycles
            return existing
        record = ReplicaRecord(
            id=cid,
            deployment=assignment.deployment,
            service=assignment.service,
            instance=instance,
            revision=revision,
            rtype=spec.rtype,
            image=spec.image.name,
            job_run=job_run,
            trigger=trigger,
        )
        replica = Replica(record, spec)
        self.replicas[cid] = replica
        self._save(replica)
        self.changed(record.info())
        replica.task = asyncio.create_task(self._lifecycle(replica, adopt=False))
        return replica

    def _remove_later(self, replica: Replica, grace: float, why: str = "no longer wanted") -> None:
        """Stop and remove a replica without making the caller wait for its grace period.

        The replica shows as stopping at once; when it is gone its service
        converges again, so a replica of the same id can take its place.
        """
        if replica.removal is not None:
            return
        self._update(replica, state="stopping", message=f"stopping: {why}")
        key = (replica.record.deployment, replica.record.service)

        async def remove() -> None:
            try:
                await self._remove(replica, grace)
            finally:
                replica.removed.set()
            async with self._lock:
                assignment = self.assignments.get(key)
                if assignment is not None:
                    await self._converge(assignment)

        replica.removal = asyncio.create_task(remove(), name=f"remove-{replica.record.id}")

    async def remove_service(
        self, deployment: str, service: str, timeout: float, force: bool
    ) -> None:
        """Unassign ``service`` of ``deployment`` ("" for all) and remove its replicas,
        each stopped within ``timeout`` seconds (at once with ``force``).

        The node's lock is held while the assignments go and the removals start,
        not through the replicas' grace periods: the node's other services change
        meanwhile (a fenced node removes all of its services at once).
        """
        await self.loaded.wait()
        grace = 0.0 if force else timeout
        async with self._lock:
            victims = [
                r
                for r in self.replicas.values()
                if r.record.deployment == deployment
                and (not service or r.record.service == service)
            ]
            # The assignments go first, on disk too: a removal cut short by agentd's stop
            # leaves records of a service no longer assigned, removed as garbage at the
            # next start, not replicas of an assigned one that would be started again.
            unassigned = [
                k for k in self.assignments if k[0] == deployment and service in ("", k[1])
            ]
            for key in unassigned:
                del self.assignments[key]
                path = self.assign_dir / f"{key[0]}--{key[1]}.json"
                self._queue_file(path, None)
                await self._file_written(path)
            for replica in victims:  # one removing already is waited for
                self._remove_later(replica, grace, "its service is removed")
        await asyncio.gather(*(r.removed.wait() for r in victims))
        async with self._lock:
            known = {*self._runs, *unassigned}
            if service:
                known.add((deployment, service))
            for owner, name in sorted(known):
                mine = owner == deployment and (not service or name == service)
                # One assigned again meanwhile (schedd deployed it again) stays.
                if mine and (owner, name) not in self.assignments:
                    self._forget(owner, name)

    async def _remove(self, replica: Replica, grace: float) -> None:
        replica.stopping = True
        # removed before schedd's first view: never released
        self._held_back = [h for h in self._held_back if h[0] is not replica]
        if replica.task is not None and not replica.task.done():
            replica.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await replica.task
        await self._teardown(replica, grace)  # the record goes with it
        self.replicas.pop(replica.record.id, None)
        replica.record.state = "stopped"
        self.changed(replica.record.info())

    async def _teardown(self, replica: Replica, grace: float) -> None:
        cid = replica.record.id
        try:
            if await self.launcher.running_pid(cid):
                await self.launcher.stop(cid, replica.spec.stop_signal or "SIGTERM", grace)
            await self.launcher.remove(cid)
        except Exception as exc:
            log.error("could not remove container %s cleanly: %s", cid, exc)
        try:
            await self.neighbours.detach(cid)
        except Exception as exc:
            log.error("could not release the network of %s: %s", cid, exc)
        await self._remove_record(cid)

    async def shutdown(self) -> None:
        """agentd is stopping: leave containers running (conmon holds them).

        A removal cut short here finishes after the restart: the replica's
        record is still there, and converging removes it again.
        """
        tasks = [
            task for r in self.replicas.values() for task in (r.task, r.removal) if task is not None
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # The files asked for last, also by the tasks as they ended (and by any call
        # answered meanwhile), reach the disk.
        while self._writers:
            path = next(iter(self._writers))
            try:
                await self._file_written(path)
            except Exception as exc:  # the others are still written
                log.error("could not write %s as agentd stopped: %s", path, exc)
                self._writers.pop(path, None)

    # ------------------------------------------------------------ queries

    def infos(self, deployment: str, service: str) -> list[ReplicaInfo]:
        return sorted(
            (
                r.record.info()
                for r in self.replicas.values()
                if (not deployment or r.record.deployment == deployment)
                and (not service or r.record.service == service)
            ),
            key=lambda i: (i.deployment, i.service, i.revision, i.instance),
        )

    def find(self, replica_id: str) -> Replica:
        replica = self.replicas.get(replica_id)
        if replica is None:
            raise NotFoundError(
                f"there is no replica {replica_id} on this node; see `zlayerctl ps --containers`"
            )
        return replica

    # ------------------------------------------------------------ jobs

    def _runs_file(self, deployment: str, service: str) -> Path:
        return self.runs_dir / f"{deployment}--{service}.json"

    def _read_runs(self) -> dict[tuple[str, str], list[JobRun]]:
        """Every job service's runs from their files (blocking: load() reads in a thread)."""
        runs: dict[tuple[str, str], list[JobRun]] = {}
        for path in self.runs_dir.glob("*--*.json"):
            found = read_state(
                path, lambda text: decode(text, list[JobRun]), "without those runs' history", log
            )
            # keyed by what the runs say: a name may hold "--" itself
            for run in found or []:
                runs.setdefault((run.deployment, run.service), []).append(run)
        return runs

    def job_runs(self, deployment: str, service: str) -> list[JobRun]:
        """The runs of ``service`` of ``deployment`` (every job service's for ""), newest first."""
        runs = [
            run
            for (owner, name), kept in self._runs.items()
            if owner == deployment and service in ("", name)
            for run in kept
        ]
        return sorted(runs, key=lambda r: r.started_at, reverse=True)

    @property
    def run_logs_dir(self) -> Path:
        return self.runs_dir / "logs"

    def _keep_run_log(self, container_id: str) -> None:
        """Keep a finished run's output after its container goes; the newest runs only."""
        self.run_logs_dir.mkdir(exist_ok=True)
        kept = self.run_logs_dir / f"{container_id}.log"
        with open(kept, "wb") as out:
            for path in self.launcher.log_paths(container_id):
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as part:
                    shutil.copyfileobj(part, out)
        prefix = container_id.rsplit("-run", 1)[0] + "-run"
        mine = sorted(
            (p for p in self.run_logs_dir.glob(f"{prefix}*.log")),
            key=lambda p: p.stat().st_mtime,
        )
        for old in mine[:-JOB_RUNS_KEPT]:
            old.unlink(missing_ok=True)

    def log_paths(self, replica_id: str) -> list[str]:
        """A replica's log files, or the kept output of a finished job run."""
        if replica_id in self.replicas:
            return self.launcher.log_paths(replica_id)
        kept = self.run_logs_dir / f"{replica_id}.log"
        if kept.is_file():
            return [str(kept)]
        raise NotFoundError(f"there is no replica or job run {replica_id} on this node")

    def _record_run(self, run: JobRun) -> None:
        key = (run.deployment, run.service)
        runs = [r for r in self._runs.get(key, []) if r.id != run.id]
        runs = sorted([run, *runs], key=lambda r: r.started_at, reverse=True)[:JOB_RUNS_KEPT]
        self._runs[key] = runs
        self._queue_file(self._runs_file(*key), encode(runs), durable=True)

    async def run_job(self, deployment: str, service: str, trigger: JobTrigger) -> JobRun:
        await self.loaded.wait()
        assignment = self.assignments.get((deployment, service))
        if assignment is None:
            raise NotFoundError(f"{service} of {deployment} is not assigned to this node")
        from shared.spec import ServiceSpec

        spec = ServiceSpec.model_validate(assignment.spec)
        started = time.time()
        run_id = f"run{int(started * 1000)}"
        run = JobRun(
            id=run_id,
            deployment=deployment,
            service=service,
            trigger=trigger,
            state="running",
            started_at=started,
        )
        self._record_run(run)
        self._create(assignment, spec, 1, job_run=run_id, trigger=trigger)
        return run

    def _finish_run(self, replica: Replica) -> None:
        record = replica.record
        if record.job_run is None:
            return
        ok = record.exit_code == 0
        run = JobRun(
            id=record.job_run,
            deployment=record.deployment,
            service=record.service,
            trigger=record.trigger or "manual",
            state="succeeded" if ok else "failed",
            exit_code=record.exit_code,
            started_at=record.started_at or time.time(),
            finished_at=time.time(),
            message=record.message,
        )
        self._record_run(run)

    # ------------------------------------------------------------ the lifecycle

    async def _prepare_and_start(self, replica: Replica) -> None:
        record, spec = replica.record, replica.spec
        collecting = self._collecting.get(record.id)
        if collecting is not None:  # a container of this id, found unowned, is on its way out
            self._update(replica, state="creating", message="waiting for an old container to go")
            await asyncio.shield(collecting)
        pid = await self.launcher.running_pid(record.id)
        if pid:
            # A container of this id runs (agentd stopped between its start and
            # the record of it): it is this replica, adopted, never started twice.
            log.info("%s is already running (pid %d); adopting it", record.id, pid)
            self._update(replica, state="running", pid=pid, message="")
            return
        # A stopped leftover of this replica's id from an earlier life: ours to clear.
        await self.launcher.remove(record.id)
        self._update(replica, state="creating", message="", health="none", refused=False)
        # The network is reserved while the image is found (neither needs the other),
        # then made while the container is created in its namespace; it starts once
        # both are done. Init steps run in a container of their own: they wait for it.
        reserving: asyncio.Future[Attachment] | None = None
        hostname = spec.hostname or f"{record.service}-{record.instance}"
        if spec.network_mode != "host":
            reserving = asyncio.ensure_future(self.neighbours.reserve(record.id, hostname))
        try:
            rootfs = await self.neighbours.ensure_image(
                spec.image.name,
                spec.image.pull_policy,
                lambda note: self._update(replica, message=note),
            )
        except BaseException:
            if reserving is not None:  # a retry or the removal deals with what it made
                reserving.cancel()
                await asyncio.gather(reserving, return_exceptions=True)
            raise
        attachment = None
        attaching: asyncio.Future[Attachment] | None = None
        if reserving is not None:
            attachment = await reserving
            self._update(replica, address=attachment.address)
            attaching = asyncio.ensure_future(self.neighbours.attach(record.id, hostname))
        try:
            await self._start_in(replica, rootfs, attachment, attaching)
        finally:
            if attaching is not None:  # ended, or not needed any more: its outcome taken
                attaching.cancel()
                await asyncio.gather(attaching, return_exceptions=True)

    async def _start_in(
        self,
        replica: Replica,
        rootfs: ImageRootfs,
        attachment: Attachment | None,
        attaching: asyncio.Future[Attachment] | None,
    ) -> None:
        """Init steps, then the container, in the network ``attaching`` completes."""
        record, spec = replica.record, replica.spec
        # Init steps run in a container of their own, and crun sets net.* sysctls at
        # the create, where eth0's own (net.ipv4.conf.eth0.*) need it: both wait.
        if attaching is not None and (
            spec.init.steps or any(key.startswith("net.") for key in spec.sysctls)
        ):
            _check_same_network(attachment, await attaching)
        if spec.init.steps:
            self._update(replica, state="initializing", message="running init steps")
            await probes.run_init(
                spec.init.steps,
                record.address,
                lambda argv, timeout: self._one_shot(replica, rootfs, attachment, argv, timeout),
                lambda note: log.info("%s: %s", record.id, note),
            )

        async def ready_to_run() -> None:
            # A container never runs without its record, and its service's assignment,
            # on disk: a restarted agentd adopts what a record of an assigned service
            # names and removes any other container (one only created, too) as garbage.
            await self._records_written(record.id)
            await self._file_written(
                self.assign_dir / f"{record.deployment}--{record.service}.json"
            )
            if attaching is not None:
                _check_same_network(attachment, await attaching)

        # Both are waited for while the container is created.
        ready = asyncio.ensure_future(ready_to_run())
        try:
            pid = await self.launcher.start(
                record.id, spec, rootfs, attachment, None, before_start=ready
            )
        finally:
            ready.cancel()  # ended, or the start failed before it was needed
            await asyncio.gather(ready, return_exceptions=True)
        self._update(
            replica,
            state="running",
            pid=pid,
            started_at=time.time(),
            finished_at=None,
            exit_code=None,
            oom_killed=False,
            message="",
            health="starting" if probes.has_probe(spec) and record.rtype == "service" else "none",
        )

    async def _one_shot(
        self,
        replica: Replica,
        rootfs: ImageRootfs,
        attachment: Attachment | None,
        argv: list[str],
        timeout: float,
    ) -> int:
        """An init.run step: the command in a container of the replica's image and network."""
        cid = f"{replica.record.id}-init"
        with contextlib.suppress(Exception):
            await self.launcher.remove(cid)
        await self.launcher.start(cid, replica.spec, rootfs, attachment, argv)
        try:
            code, _oom = await asyncio.wait_for(self.launcher.wait(cid), timeout)
            return code
        except TimeoutError:
            await self.launcher.stop(cid, "SIGKILL", 0)
            raise
        finally:
            with contextlib.suppress(Exception):
                await self.launcher.remove(cid)

    async def _watch_health(self, replica: Replica) -> None:
        record, spec = replica.record, replica.spec

        def report(result: probes.HealthResult) -> None:
            if result.healthy:
                self._update(replica, health="healthy", message="")
            else:
                self._update(replica, health="unhealthy", message=f"unhealthy: {result.reason}")
                HEALTH_FAILURES.labels(record.deployment, record.service).inc()
                replica.restart_requested = f"unhealthy: {result.reason}"
                asyncio.get_running_loop().create_task(
                    self.launcher.stop(record.id, spec.stop_signal or "SIGTERM", _grace(spec))
                )

        async def run(argv: list[str], timeout: float) -> int:
            return await self.launcher.exec(record.id, argv, False, -1, -1, -1)

        await probes.monitor(spec, record.address, run, report)

    async def _lifecycle(self, replica: Replica, adopt: bool) -> None:
        record, spec = replica.record, replica.spec
        attempts = record.restarts
        while True:
            started = time.monotonic()
            if not adopt:
                try:
                    await self._prepare_and_start(replica)
                except asyncio.CancelledError:
                    raise
                except SpecRefused as exc:
                    # No retry can start it: failed once, until a deploy or a new revision.
                    record.refused = True  # saved with the failure
                    await self._after_failed_start(replica, str(exc), "fail")
                    return
                except probes.InitFailed as exc:
                    if not await self._after_failed_start(
                        replica, str(exc), spec.errors.on_init_failure.action
                    ):
                        return
                    attempts += 1
                    continue
                except Exception as exc:
                    reason = exc.args[0] if isinstance(exc, ZLayerError) and exc.args else str(exc)
                    if not await self._after_failed_start(replica, reason, "backoff"):
                        return
                    attempts += 1
                    continue
            elif record.state == "running" and probes.has_probe(spec) and record.health == "none":
                self._update(replica, health="starting")
            adopt = False
            health = None
            if record.rtype == "service" and probes.has_probe(spec):
                health = asyncio.create_task(self._watch_health(replica))
            try:
                code, oom = await self.launcher.wait(record.id)
            finally:
                if health is not None:
                    health.cancel()
            ran = time.monotonic() - started
            unhealthy = replica.restart_requested
            replica.restart_requested = ""
            why = unhealthy or (f"OOM-killed (exit {code})" if oom else f"exited with code {code}")
            if code != 0 and spec.wasm is not None:  # a WebAssembly limit, named
                paths = self.launcher.log_paths(record.id)
                why = await asyncio.to_thread(wasm.limit_reason, spec, code, paths) or why
            self._update(
                replica,
                state="exited",
                pid=0,
                exit_code=code,
                oom_killed=oom,
                finished_at=time.time(),
                health="none",
                message=why,
            )
            if record.job_run is not None:
                self._finish_run(replica)
            if ran >= STABLE_RUN:
                attempts = 0
            if replica.stopping or not RestartDecision.should_restart(
                spec, code, attempts, bool(unhealthy)
            ):
                if record.job_run is not None:
                    # The run's outcome lives on in the job history (on disk before the
                    # container and its record go), its output in the kept log.
                    await asyncio.to_thread(self._keep_run_log, record.id)
                    await self._file_written(self._runs_file(record.deployment, record.service))
                    await self._teardown(replica, 0.0)
                    self.replicas.pop(record.id, None)
                return
            attempts += 1
            delay = RestartDecision.delay(spec, attempts)
            self._update(
                replica,
                state="restarting",
                restarts=record.restarts + 1,
                message=f"{why}; restarting in {delay:.0f}s",
            )
            RESTARTS.labels(record.deployment, record.service).inc()
            await self._backoff(replica, delay)
            await self.launcher.remove(record.id)

    async def _after_failed_start(self, replica: Replica, reason: str, action: str) -> bool:
        """Record a start that failed; True when the replica should try again (after a pause)."""
        log.warning("%s did not start: %s", replica.record.id, reason)
        with contextlib.suppress(Exception):
            await self.launcher.remove(replica.record.id)
        if action == "fail" or replica.record.job_run is not None:
            self._update(replica, state="failed", message=reason, pid=0)
            if replica.record.job_run is not None:
                self._finish_run(replica)
                await asyncio.to_thread(self._keep_run_log, replica.record.id)
                record = replica.record
                await self._file_written(self._runs_file(record.deployment, record.service))
                await self._teardown(replica, 0.0)
                self.replicas.pop(replica.record.id, None)
            return False
        attempts = replica.record.restarts + 1
        delay = 1.0 if action == "restart" else RestartDecision.delay(replica.spec, attempts)
        self._update(
            replica,
            state="failed",
            message=f"{reason}; retrying in {delay:.0f}s",
            restarts=attempts,
            pid=0,
        )
        RESTARTS.labels(replica.record.deployment, replica.record.service).inc()
        await self._backoff(replica, delay)
        return True

    @staticmethod
    async def _backoff(replica: Replica, delay: float) -> None:
        """Wait ``delay`` seconds, or less when a deploy asks for a retry now."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replica.retry_now.wait(), delay)
        replica.retry_now.clear()


def _grace(spec: ServiceSpec) -> float:
    return spec.stop_grace_period.total_seconds() if spec.stop_grace_period else DEFAULT_GRACE


def _remove_matching(directory: Path, pattern: str) -> None:
    """Remove the files of ``directory`` that match ``pattern`` (blocking)."""
    for path in directory.glob(pattern):
        path.unlink(missing_ok=True)


def _check_same_network(reserved: Attachment | None, attached: Attachment) -> None:
    """ContainerError when Attach answered another address than Reserve (overlayd lost
    its allocations and restarted in between): the start fails and is tried again, so
    the replica never runs with a record and /etc/hosts that name another address."""
    if reserved is not None and reserved.address != attached.address:
        raise ContainerError(
            f"its network changed while it started ({reserved.address}, then "
            f"{attached.address}); it is started again"
        )
