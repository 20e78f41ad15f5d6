"""The D-Bus contract between the daemons and zlayerctl.

One definition serves both sides: a daemon subclasses its interface here and
overrides the members (``dbus_method_async_override``), and zlayerctl makes
a proxy of the same class. Every interface carries ``Version`` and
``Status``; later capabilities add their own members.

Errors cross the bus as named D-Bus errors (``org.zlayer.Error.NotFound``
...). Raising a :class:`ZLayerError` subclass in a daemon delivers that name
and its sentence; the caller's proxy raises the same class again.

The generated introspection XML of these interfaces is checked in under
``units/dbus/``; regenerate it with ``python -m shared.introspect``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import sdbus
from sdbus import (
    DbusFailedError,
    DbusInterfaceCommonAsync,
    DbusPropertyConstFlag,
    DbusPropertyEmitsChangeFlag,
    DbusUnprivilegedFlag,
    dbus_method_async,
    dbus_property_async,
    dbus_signal_async,
)

from shared.paths import Paths
from shared.wire.daemon import STATUS_SIGNATURE, StatusTuple

BUS_ADDRESS_ENV = "ZLAYER_BUS_ADDRESS"
ERROR_PREFIX = "org.zlayer.Error."

# ---------------------------------------------------------------- errors


class ZLayerError(DbusFailedError):
    """Base of every ZLayer bus error; its message is a sentence for a person."""

    dbus_error_name = ERROR_PREFIX + "Failed"


class NotFoundError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "NotFound"


class InvalidSpecError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "InvalidSpec"


class InvalidArgumentError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "InvalidArgument"


class AlreadyExistsError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "AlreadyExists"


class ConflictError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "Conflict"


class UnavailableError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "Unavailable"


class NotSupportedError(ZLayerError):
    dbus_error_name = ERROR_PREFIX + "NotSupported"


ERRORS: tuple[type[ZLayerError], ...] = (
    ZLayerError,
    NotFoundError,
    InvalidSpecError,
    InvalidArgumentError,
    AlreadyExistsError,
    ConflictError,
    UnavailableError,
    NotSupportedError,
)

# ---------------------------------------------------------------- interfaces


def _daemon_members() -> tuple[Any, Any]:
    """Fresh ``Version`` and ``Status`` members for one interface class.

    sdbus binds a member to the interface of the class body it appears in, so
    each interface needs its own pair; this keeps their contract in one place.
    """

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def version(self: Any) -> str:
        """The daemon's version."""
        raise NotImplementedError

    @dbus_method_async(
        result_signature=STATUS_SIGNATURE,
        result_args_names=("status",),
        flags=DbusUnprivilegedFlag,
    )
    async def status(self: Any) -> StatusTuple:
        """(name, state, version, pid, started_at_usec, metrics_url, supervisor, detail)."""
        raise NotImplementedError

    return version, status


def _sync_traffic_member() -> Any:
    """A fresh ``SyncTraffic`` for each interface that holds traffic (overlayd, proxyd)."""

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("views",),
        result_args_names=("result",),
    )
    async def sync_traffic(self: Any, views: str) -> str:
        """shared.traffic.TrafficViews: every deployment's traffic; SyncResult.

        Replaces what is held; deployments the views do not name are removed.
        A deployment whose part cannot be applied is named in ``refusals``
        and keeps what it had; the rest apply. Older views are refused.
        """
        raise NotImplementedError

    return sync_traffic


# Rich values travel as JSON text of the Structs in shared.wire (named in
# each member's docstring). Methods that change state are privileged: on the
# system bus only root may call them (units/dbus/org.zlayer.conf).


class Scheduler1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Scheduler1"):
    """zlayer-schedd: desired state, reconcile loop, placement, rollouts."""

    version, status = _daemon_members()

    @dbus_method_async(
        input_signature="ssa{ss}",
        result_signature="s",
        input_args_names=("spec_text", "filename", "host_env"),
        result_args_names=("deployment",),
    )
    async def deploy(self, spec_text: str, filename: str, host_env: dict[str, str]) -> str:
        """Store a new revision and start converging to it; returns Deployed.

        ``host_env`` holds the deploying host's values for the ``$E:`` references.
        Deployed's job ends done (its result the final DeploymentStatus) once
        every service runs, or failed with the reason a service or the
        deployment failed; its progress has one item per service.
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ssa{ss}",
        result_signature="s",
        input_args_names=("spec_text", "filename", "host_env"),
        result_args_names=("plan",),
    )
    async def plan(self, spec_text: str, filename: str, host_env: dict[str, str]) -> str:
        """What Deploy would do, nothing run; returns DeployPlan."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ssa{ss}",
        result_signature="s",
        input_args_names=("spec_text", "filename", "host_env"),
        result_args_names=("check",),
    )
    async def validate(self, spec_text: str, filename: str, host_env: dict[str, str]) -> str:
        """Check a spec as ``zlayerctl validate`` does, nothing stored; returns SpecCheck.

        Every located problem of an invalid spec, or a valid one's services and what
        this node refuses or warns about. ``host_env`` as Deploy's; a check uses none
        of its values. Root only, as Plan: the check is zlayerctl's, which falls back
        to checking the file itself for other users.
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="t",
        input_args_names=("deployment",),
        result_args_names=("job_id",),
    )
    async def down(self, deployment: str) -> int:
        """Remove a deployment: every replica, volume-less trace and revision.

        Returns once the intent is stored, with a job that ends when the
        deployment is gone (its progress: the replicas left). The deployment
        shows as ``removing`` until its replicas are gone, then GetDeployment
        says NotFound. A removal cut short by a stop finishes at the next start.
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ssdb",
        result_signature="t",
        input_args_names=("deployment", "service", "timeout_sec", "force"),
        result_args_names=("job_id",),
    )
    async def stop(self, deployment: str, service: str, timeout_sec: float, force: bool) -> int:
        """Stop a deployment's replicas (one service if ``service`` is not empty), keep it.

        Returns once stored, with a job that ends when the services run no
        replica and none still stops, or the deployment is gone (its
        progress: the replicas stopped of those to stop). The services'
        running counts fall to 0 as their replicas end (GetDeployment shows it).
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ssu",
        result_signature="t",
        input_args_names=("deployment", "service", "replicas"),
        result_args_names=("job_id",),
    )
    async def scale(self, deployment: str, service: str, replicas: int) -> int:
        """Hold a service at ``replicas`` until the next deploy or scale.

        Returns with a job that ends when the service runs ``replicas`` at
        most and none still stops, or the deployment is gone: a scale-down
        ends once the surplus has stopped, a scale-up at once.
        """
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("deployments",), flags=DbusUnprivilegedFlag
    )
    async def list_deployments(self) -> str:
        """list[DeploymentStatus]."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("deployment",),
        result_args_names=("status",),
        flags=DbusUnprivilegedFlag,
    )
    async def get_deployment(self, deployment: str) -> str:
        """DeploymentStatus."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("deployment",),
        result_args_names=("spec_text",),
    )
    async def get_spec(self, deployment: str) -> str:
        """The spec text of the deployment's current revision, as it was deployed.

        Root only, like Plan: a spec names its environment values.
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("deployment", "service"),
        result_args_names=("run",),
    )
    async def trigger_job(self, deployment: str, service: str) -> str:
        """Start a run of a job or cron service now; returns JobRun."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("deployment",),
        result_args_names=("schedules",),
        flags=DbusUnprivilegedFlag,
    )
    async def list_cron(self, deployment: str) -> str:
        """list[CronSchedule]: each cron service's schedule, next and last run."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="i",
        input_args_names=("deployment",),
        result_args_names=("revision",),
    )
    async def rollback(self, deployment: str) -> int:
        """Deploy the previous revision's spec again as a new revision; its number."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="su",
        result_signature="s",
        input_args_names=("deployment", "limit"),
        result_args_names=("events",),
        flags=DbusUnprivilegedFlag,
    )
    async def list_events(self, deployment: str, limit: int) -> str:
        """list[Event], oldest first: the last ``limit`` of a deployment ("" for all)."""
        raise NotImplementedError

    @dbus_method_async(input_signature="s", input_args_names=("daemon",))
    async def resync(self, daemon: str) -> None:
        """A daemon that holds a view (agentd, overlayd, proxyd) has started: send it the
        complete view now. ``daemon`` is its short name; "" resyncs every one."""
        raise NotImplementedError

    @dbus_signal_async("s", signal_args_names=("event",))
    def event_emitted(self) -> str:
        """An Event: something happened to a deployment."""
        raise NotImplementedError

    # --- jobs: Deploy, Down, Stop and Scale return jobs that end when the
    # deployment has converged, is gone or has stopped what it was to stop,
    # as Job1 objects under <this object>/job/<id> (shared/jobs.py). Cancelling
    # one stops the waiting only: the desired state stays stored and the loop
    # carries it out.

    @dbus_method_async(
        input_signature="t",
        result_signature="s",
        input_args_names=("job_id",),
        result_args_names=("job",),
        flags=DbusUnprivilegedFlag,
    )
    async def get_job(self, job_id: int) -> str:
        """shared.jobs.JobInfo of a running or recently finished job."""
        raise NotImplementedError

    @dbus_method_async(input_signature="t", input_args_names=("job_id",))
    async def cancel_job(self, job_id: int) -> None:
        """Stop waiting on a running job (the deployment keeps its desired state);
        NotFound if it is not running."""
        raise NotImplementedError

    @dbus_signal_async("tos", signal_args_names=("job_id", "job_path", "kind"))
    def job_new(self) -> tuple[int, str, str]:
        """A job started; its Job1 object is at ``job_path`` while it runs."""
        raise NotImplementedError

    @dbus_signal_async("tos", signal_args_names=("job_id", "job_path", "job"))
    def job_removed(self) -> tuple[int, str, str]:
        """A job ended (done, failed or cancelled) and its object is gone; its final JobInfo."""
        raise NotImplementedError

    # --- secrets: kept encrypted in schedd's store, resolved into a replica's env
    # (``$S:NAME``) only in what schedd sends agentd. Root only, as Plan is: no
    # DbusUnprivilegedFlag, and the bus policy lets no other user call them.

    @dbus_method_async(
        input_signature="sss",
        result_signature="s",
        input_args_names=("name", "deployment", "value"),
        result_args_names=("secret",),
    )
    async def set_secret(self, name: str, deployment: str, value: str) -> str:
        """Set a secret (node-wide when ``deployment`` is ""); returns SecretInfo.

        The services that use it roll, as with a deploy.
        """
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("secrets",))
    async def list_secrets(self) -> str:
        """list[SecretInfo]: names, scopes and times, never a value."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("name", "deployment"),
        result_args_names=("secret",),
    )
    async def get_secret(self, name: str, deployment: str) -> str:
        """SecretValue: one secret's value."""
        raise NotImplementedError

    @dbus_method_async(input_signature="ss", input_args_names=("name", "deployment"))
    async def remove_secret(self, name: str, deployment: str) -> None:
        """Remove a secret; the services that used it roll to the node-wide one.

        Refused (Conflict) while a deployment uses it and nothing else would resolve it.
        """
        raise NotImplementedError

    @dbus_method_async(input_signature="ssb", input_args_names=("deployment", "service", "enabled"))
    async def set_cron_enabled(self, deployment: str, service: str, enabled: bool) -> None:
        """Turn a cron service's schedule off (it does not fire) or on again; kept across
        restarts and deploys."""
        raise NotImplementedError

    # --- the cluster (issue 13): root only, as the secrets are

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("advertise",),
        result_args_names=("node",),
    )
    async def node_init(self, advertise: str) -> str:
        """Make this lone node a one-node cluster: a cluster CA, cluster.toml, an etcd
        member, the desired state moved into etcd; returns its NodeRecord.

        ``advertise`` is the address other nodes reach it at ("" picks one).
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="d",
        result_signature="s",
        input_args_names=("ttl_sec",),
        result_args_names=("token",),
    )
    async def node_join_token(self, ttl_sec: float) -> str:
        """A join token (one line) valid for ``ttl_sec`` seconds (0: a day)."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("token", "advertise"),
        result_args_names=("node",),
    )
    async def node_join(self, token: str, advertise: str) -> str:
        """Join the cluster of ``token`` (an etcd voter while it has fewer than 3, a
        client after); returns this node's NodeRecord."""
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("nodes",))
    async def list_nodes(self) -> str:
        """NodeList: the cluster's live nodes and its leader."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="sa{ss}as",
        result_signature="s",
        input_args_names=("node", "labels", "remove"),
        result_args_names=("settings",),
    )
    async def label_node(self, node: str, labels: dict[str, str], remove: list[str]) -> str:
        """Set ``labels`` on a node and remove the keys in ``remove``; NodeSettings."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("node",),
        result_args_names=("settings",),
    )
    async def drain_node(self, node: str) -> str:
        """Mark a node draining: placement moves its replicas away; NodeSettings."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("node",),
        result_args_names=("settings",),
    )
    async def undrain_node(self, node: str) -> str:
        """A drained node back in service: placement may use it again; NodeSettings."""
        raise NotImplementedError

    @dbus_method_async(input_signature="s", input_args_names=("node",))
    async def remove_node(self, node: str) -> None:
        """Take another node out of the cluster: its record and its etcd member go."""
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("node",))
    async def rotate_mesh_key(self) -> str:
        """A new mesh key pair for this node (overlayd's RotateMeshKey), published in
        its record at once so the other nodes take it; returns its NodeRecord."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("deployment",),
        result_args_names=("replicas",),
        flags=DbusUnprivilegedFlag,
    )
    async def list_replicas(self, deployment: str) -> str:
        """list[ReplicaInfo] of ``deployment`` ("" for all) on every node, each naming its
        node in a cluster: this node's from agentd and those the other nodes publish.
        zlayerctl falls back to agentd's ListReplicas (this node's) when schedd cannot say."""
        raise NotImplementedError


class Agent1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Agent1"):
    """zlayer-agentd: containers, health checks, jobs on this node."""

    version, status = _daemon_members()

    @dbus_method_async(input_signature="s", input_args_names=("assignment",))
    async def apply_service(self, assignment: str) -> None:
        """ServiceAssignment: converge this node's replicas of a service to it."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("assignments",),
        result_args_names=("result",),
    )
    async def sync_assignments(self, assignments: str) -> str:
        """NodeAssignments: everything this node should run; SyncResult.

        Replaces every assignment; the replicas of services it does not name
        are stopped (with their grace period) and removed. Refused, not an
        error, when older than the view held.
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ssdb", input_args_names=("deployment", "service", "timeout_sec", "force")
    )
    async def remove_service(
        self, deployment: str, service: str, timeout_sec: float, force: bool
    ) -> None:
        """Stop (signal, grace, KILL) and delete a service's replicas; "" = every service."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("deployment", "service"),
        result_args_names=("replicas",),
        flags=DbusUnprivilegedFlag,
    )
    async def list_replicas(self, deployment: str, service: str) -> str:
        """list[ReplicaInfo]; empty strings match everything."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="as",
        input_args_names=("replica",),
        result_args_names=("paths",),
    )
    async def log_paths(self, replica: str) -> list[str]:
        """A replica's log files (k8s-file format), oldest first."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="sasbhhh",
        result_signature="i",
        input_args_names=("replica", "argv", "tty", "stdin", "stdout", "stderr"),
        result_args_names=("exit_code",),
    )
    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int:
        """Run ``argv`` in a replica with the caller's file descriptors; its exit code."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("replica",),
        result_args_names=("stats",),
        flags=DbusUnprivilegedFlag,
    )
    async def stats(self, replica: str) -> str:
        """ReplicaStats."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="sss",
        result_signature="s",
        input_args_names=("deployment", "service", "trigger"),
        result_args_names=("run",),
    )
    async def run_job(self, deployment: str, service: str, trigger: str) -> str:
        """Start one run of an assigned job or cron service; JobRun."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("deployment", "service"),
        result_args_names=("runs",),
        flags=DbusUnprivilegedFlag,
    )
    async def list_job_runs(self, deployment: str, service: str) -> str:
        """list[JobRun], newest first."""
        raise NotImplementedError

    @dbus_signal_async("s", signal_args_names=("replica",))
    def replica_changed(self) -> str:
        """ReplicaInfo of a replica whose state or health changed."""
        raise NotImplementedError


class Registry1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Registry1"):
    """zlayer-registryd: images, blobs, layers, builds."""

    version, status = _daemon_members()

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("path", "name"),
        result_args_names=("image",),
    )
    async def import_image(self, path: str, name: str) -> str:
        """Import an OCI layout dir, oci-archive or docker-save tar; ImageInfo."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="stt",
        result_signature="b",
        input_args_names=("path", "device", "inode"),
        result_args_names=("visible",),
    )
    async def path_visible(self, path: str, device: int, inode: int) -> bool:
        """Whether ``path`` names, for registryd, the file whose stat() gave device and inode.

        Under systemd registryd has its own /tmp and no /home; a client whose
        path is not visible sends it with Receive instead.
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="h",
        result_signature="s",
        input_args_names=("fd",),
        result_args_names=("path",),
    )
    async def receive(self, fd: int) -> str:
        """Read a tar stream of one file or directory from ``fd``; where registryd put it.

        The tar is followed by SEND_COMPLETE; a stream without it was cut
        short and is refused.

        The path stands in for the client's own in the next call (ImportImage,
        Build, PushWasm) and is removed when that call or job ends.
        """
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("images",), flags=DbusUnprivilegedFlag
    )
    async def list_images(self) -> str:
        """list[ImageInfo]."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("reference",),
        result_args_names=("detail",),
        flags=DbusUnprivilegedFlag,
    )
    async def inspect_image(self, reference: str) -> str:
        """ImageDetail."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="sb",
        result_signature="as",
        input_args_names=("reference", "force"),
        result_args_names=("removed",),
    )
    async def remove_image(self, reference: str, force: bool) -> list[str]:
        """Untag, and delete what nothing else references; what was removed."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("reference", "pull_policy"),
        result_args_names=("rootfs",),
    )
    async def ensure_image(self, reference: str, pull_policy: str) -> str:
        """Make an image's layers available unpacked; ImageRootfs."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ss",
        result_signature="ts",
        input_args_names=("reference", "pull_policy"),
        result_args_names=("job_id", "rootfs"),
    )
    async def ensure_image_job(self, reference: str, pull_policy: str) -> tuple[int, str]:
        """EnsureImage as a job: (0, ImageRootfs) at once when no pull is needed; else
        (the id of the ``ensure-image`` job that pulls, ""), whose result is the ImageRootfs."""
        raise NotImplementedError

    # --- jobs: long operations (pull, push, build, export) return a job id at
    # once and run as Job1 objects under <this object>/job/<id>; see shared/jobs.py.

    @dbus_method_async(
        input_signature="t",
        result_signature="s",
        input_args_names=("job_id",),
        result_args_names=("job",),
        flags=DbusUnprivilegedFlag,
    )
    async def get_job(self, job_id: int) -> str:
        """shared.jobs.JobInfo of a running or recently finished job."""
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("jobs",), flags=DbusUnprivilegedFlag
    )
    async def list_jobs(self) -> str:
        """list[shared.jobs.JobInfo]."""
        raise NotImplementedError

    @dbus_method_async(input_signature="t", input_args_names=("job_id",))
    async def cancel_job(self, job_id: int) -> None:
        """Cancel a running job; NotFound if it is not running."""
        raise NotImplementedError

    @dbus_signal_async("tos", signal_args_names=("job_id", "job_path", "kind"))
    def job_new(self) -> tuple[int, str, str]:
        """A job started; its Job1 object is at ``job_path`` while it runs."""
        raise NotImplementedError

    @dbus_signal_async("tos", signal_args_names=("job_id", "job_path", "job"))
    def job_removed(self) -> tuple[int, str, str]:
        """A job ended (done, failed or cancelled) and its object is gone; its final JobInfo."""
        raise NotImplementedError

    # --- registry client (pull, push, login): below this line

    @dbus_method_async(
        input_signature="sss",
        result_signature="t",
        input_args_names=("reference", "pull_policy", "auth"),
        result_args_names=("job_id",),
    )
    async def pull(self, reference: str, pull_policy: str, auth: str) -> int:
        """Pull an image from its registry as a job; its result is ImageInfo.

        ``auth``: a Docker-config ``auth`` value (base64 user:password) the
        caller found in its user's auth files, or "" to use registryd's own.
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="sss",
        result_signature="t",
        input_args_names=("reference", "destination", "auth"),
        result_args_names=("job_id",),
    )
    async def push(self, reference: str, destination: str, auth: str) -> int:
        """Push a stored image to ``destination`` (or its own name) as a job."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="sss",
        result_signature="s",
        input_args_names=("registry", "username", "password"),
        result_args_names=("registry",),
    )
    async def login(self, registry: str, username: str, password: str) -> str:
        """Check credentials against a registry and keep them; the registry's name."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="b",
        input_args_names=("registry",),
        result_args_names=("removed",),
    )
    async def logout(self, registry: str) -> bool:
        """Forget the credentials kept for a registry; whether there were any."""
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("pruned",))
    async def prune(self) -> str:
        """Remove images no replica uses, then blobs and layers no image references;
        a PruneResult."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="shb",
        result_signature="t",
        input_args_names=("reference", "fd", "gzip"),
        result_args_names=("job_id",),
    )
    async def export_image(self, reference: str, fd: int, gzip: bool) -> int:
        """Write an image as an oci-archive to ``fd`` as a job; its result is ImageInfo."""
        raise NotImplementedError

    # --- builds: below this line

    @dbus_method_async(
        input_signature="s",
        result_signature="t",
        input_args_names=("request",),
        result_args_names=("job_id",),
    )
    async def build(self, request: str) -> int:
        """Start building an image (a shared.wire.registry.BuildRequest) as a job;
        its log_path receives buildah's output, its result is a BuildResult."""
        raise NotImplementedError

    # --- wasm artifacts: below this line

    @dbus_method_async(
        input_signature="sssb",
        result_signature="t",
        input_args_names=("path", "reference", "auth", "tls_verify"),
        result_args_names=("job_id",),
    )
    async def push_wasm(self, path: str, reference: str, auth: str, tls_verify: bool) -> int:
        """Push the binary at ``path`` as a Wasm artifact to ``reference``, as a job.

        ``auth`` as for Pull ("" uses registryd's own credentials); the job's
        result is a shared.wasm.WasmArtifact whose location is the reference.
        """
        raise NotImplementedError

    # --- the store's changes: below this line

    @dbus_signal_async("s", signal_args_names=("image",))
    def image_stored(self) -> str:
        """ImageInfo of an image just stored or given another name (import, pull, build);
        agentd compiles a WebAssembly one before a replica needs it."""
        raise NotImplementedError


class Overlay1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Overlay1"):
    """zlayer-overlayd: bridge, IPAM, service DNS, port publishing, mesh."""

    version, status = _daemon_members()

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("container_id", "hostname"),
        result_args_names=("attachment",),
    )
    async def attach(self, container_id: str, hostname: str) -> str:
        """Create a network namespace on the node bridge with its own address; Attachment.

        Idempotent: attaching an attached container returns its attachment.
        """
        raise NotImplementedError

    @dbus_method_async(
        input_signature="ss",
        result_signature="s",
        input_args_names=("container_id", "hostname"),
        result_args_names=("attachment",),
    )
    async def reserve(self, container_id: str, hostname: str) -> str:
        """The container's address and its network namespace (empty when made now); the
        Attachment that Attach will answer. A container can be created in the namespace
        while Attach makes the rest; it starts once Attach has answered. Idempotent.
        """
        raise NotImplementedError

    @dbus_method_async(input_signature="s", input_args_names=("container_id",))
    async def detach(self, container_id: str) -> None:
        """Remove the namespace, veth and address of a container; no error if gone."""
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("attachments",), flags=DbusUnprivilegedFlag
    )
    async def list_attachments(self) -> str:
        """list[Attachment]."""
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("network",), flags=DbusUnprivilegedFlag
    )
    async def get_network(self) -> str:
        """NetworkInfo."""
        raise NotImplementedError

    sync_traffic = _sync_traffic_member()

    @dbus_method_async(input_signature="ss", input_args_names=("deployment", "traffic"))
    async def set_traffic(self, deployment: str, traffic: str) -> None:
        """Replace a deployment's service DNS records and kernel-path published ports.

        ``traffic`` is a shared.traffic.DeploymentTraffic; one with no
        services removes the deployment's records and ports.
        """
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("records",), flags=DbusUnprivilegedFlag
    )
    async def list_records(self) -> str:
        """list[shared.traffic.DnsRecord]: every name the service DNS answers."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="q",
        result_signature="s",
        input_args_names=("listen_port",),
        result_args_names=("mesh",),
    )
    async def enable_mesh(self, listen_port: int) -> str:
        """Bring the node's WireGuard interface up on ``listen_port``; shared.wire.mesh.MeshStatus.

        Makes the node's key pair (kept in overlayd's state) if it has none.
        Idempotent; the mesh stays on across restarts until the network is removed.
        """
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("mesh",), flags=DbusUnprivilegedFlag
    )
    async def get_mesh(self) -> str:
        """shared.wire.mesh.MeshStatus: the interface, its public key and each peer's handshake."""
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("mesh",))
    async def rotate_mesh_key(self) -> str:
        """A new key pair for the running interface; MeshStatus with the new public key.

        Peers reach the node again once they are given the new key.
        """
        raise NotImplementedError


class Proxy1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Proxy1"):
    """zlayer-proxyd: L4/L7 ingress and load balancing."""

    version, status = _daemon_members()

    sync_traffic = _sync_traffic_member()

    @dbus_method_async(input_signature="ss", input_args_names=("deployment", "traffic"))
    async def set_traffic(self, deployment: str, traffic: str) -> None:
        """Replace a deployment's routes and backends (a shared.traffic.DeploymentTraffic).

        Established connections are kept: a backend that leaves rotation gets
        no new requests, and its open connections finish or time out.
        """
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("routes",), flags=DbusUnprivilegedFlag
    )
    async def list_routes(self) -> str:
        """list[shared.traffic.RouteInfo]: every listener and route with its backends."""
        raise NotImplementedError

    @dbus_method_async(
        result_signature="s", result_args_names=("stats",), flags=DbusUnprivilegedFlag
    )
    async def service_stats(self) -> str:
        """list[shared.traffic.ServiceStats]: request counters per service, for autoscaling."""
        raise NotImplementedError


class Job1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Job1"):
    """One long operation of a daemon, as systemd's Job objects are.

    Exported at ``<daemon object>/job/<id>`` from JobNew until JobRemoved;
    State and Progress announce their changes (PropertiesChanged), so a
    client follows a job by signals instead of asking again and again.
    """

    @dbus_property_async("t", flags=DbusPropertyConstFlag)
    def id(self) -> int:
        """The job's number, unique in its daemon until the daemon restarts."""
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def kind(self) -> str:
        """pull, push, build, export, push-wasm, ..."""
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def target(self) -> str:
        """What it works on: an image reference, a build tag."""
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def log_path(self) -> str:
        """A file the job appends its output to (a build's); "" if none."""
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag)
    def state(self) -> str:
        """running, then done, failed or cancelled."""
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag)
    def progress(self) -> str:
        """list[shared.wire.jobs.ProgressItem]: one item per layer or stage."""
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("job",), flags=DbusUnprivilegedFlag)
    async def get_info(self) -> str:
        """shared.wire.jobs.JobInfo: everything above in one reply."""
        raise NotImplementedError

    @dbus_method_async()
    async def cancel(self) -> None:
        """Stop the job; it ends as cancelled (JobRemoved says so)."""
        raise NotImplementedError


class Api1(DbusInterfaceCommonAsync, interface_name="org.zlayer.Api1"):
    """zlayer-apid: the REST gateway onto the bus."""

    version, status = _daemon_members()

    # The API's tokens: root's alone, listing included (the names and scopes
    # of the tokens are a map of who may do what).

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("request",),
        result_args_names=("issued",),
    )
    async def create_token(self, request: str) -> str:
        """shared.wire.api.TokenCreate; TokenIssued, the only time the token's text is shown."""
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("tokens",))
    async def list_tokens(self) -> str:
        """list[shared.wire.api.TokenInfo]: every token, revoked ones too; never their text."""
        raise NotImplementedError

    @dbus_method_async(
        input_signature="s",
        result_signature="s",
        input_args_names=("name",),
        result_args_names=("token",),
    )
    async def revoke_token(self, name: str) -> str:
        """Revoke the token ``name`` at once (its next request is refused); its TokenInfo."""
        raise NotImplementedError


# ---------------------------------------------------------------- the daemons


@dataclass(frozen=True)
class DaemonInfo:
    """What the rest of the system needs to know about one daemon."""

    name: str  # short name: schedd
    bus_name: str  # also the interface name: org.zlayer.Scheduler1
    interface: type[DbusInterfaceCommonAsync]
    default_metrics_port: int

    @property
    def object_path(self) -> str:
        return "/" + self.bus_name.replace(".", "/")

    @property
    def executable(self) -> str:
        return f"zlayer-{self.name}"

    @property
    def unit(self) -> str:
        return f"zlayer-{self.name}.service"


DAEMONS: tuple[DaemonInfo, ...] = (
    DaemonInfo("schedd", "org.zlayer.Scheduler1", Scheduler1, 9301),
    DaemonInfo("agentd", "org.zlayer.Agent1", Agent1, 9302),
    DaemonInfo("registryd", "org.zlayer.Registry1", Registry1, 9303),
    DaemonInfo("overlayd", "org.zlayer.Overlay1", Overlay1, 9304),
    DaemonInfo("proxyd", "org.zlayer.Proxy1", Proxy1, 9305),
    DaemonInfo("apid", "org.zlayer.Api1", Api1, 9306),
)
DAEMONS_BY_NAME: dict[str, DaemonInfo] = {d.name: d for d in DAEMONS}


# ---------------------------------------------------------------- connecting


def resolve_bus_address(paths: Paths, environ: dict[str, str] | None = None) -> str | None:
    """The bus the daemons are on: an explicit address, the private bus, or None.

    None means the system bus, where the daemons run under systemd.
    """
    env = os.environ if environ is None else environ
    if env.get(BUS_ADDRESS_ENV):
        return env[BUS_ADDRESS_ENV]
    try:
        address = paths.bus_address_file.read_text().strip()
    except OSError:
        return None
    return address or None


def open_bus(address: str | None) -> sdbus.SdBus:
    """Open a bus connection: the given address, or the system bus for None."""
    if address is None:
        return sdbus.sd_bus_open_system()
    # sd-bus takes a custom address only through this variable; it is read at
    # open time, so setting it for our own process is enough.
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    return sdbus.sd_bus_open_system()


# Registry1.Receive: what follows a tar stream the sender finished.
SEND_COMPLETE = b"ZLAYER-SEND-COMPLETE\n"
