"""The REST API's own values: request bodies, operation references, problems, tokens.

Replies that are bus values (DeploymentStatus, ReplicaInfo, JobInfo, ...) travel
as the same ``shared.wire`` Structs the bus carries; only what the bus has no
type for lives here. Names are stable once published in the OpenAPI document.
"""

from __future__ import annotations

from typing import Literal

from shared.wire import Wire
from shared.wire.daemon import DaemonStatus

OperationDaemon = Literal["scheduler", "registry"]


class OperationRef(Wire, frozen=True):
    """A long operation started by a request (202): follow it at ``/operations/{daemon}/{id}``."""

    daemon: OperationDaemon
    id: int


class DeployRequest(Wire, frozen=True):
    """``POST /deployments`` as JSON: the spec's YAML text and the environment it may use."""

    spec: str
    filename: str = ""
    env: dict[str, str] = {}


class ScaleRequest(Wire, frozen=True):
    replicas: int


class StopRequest(Wire, frozen=True):
    service: str = ""  # "" stops every service of the deployment
    timeout: float = 10.0
    force: bool = False


class ExecRequest(Wire, frozen=True):
    command: list[str]
    replica: str = ""  # "" picks the service's first running replica


class ExecResult(Wire, frozen=True):
    exit_code: int
    stdout: str
    stderr: str


class LogLine(Wire, frozen=True):
    """One line of a replica's output, as the logs stream carries it (one JSON per line)."""

    replica: str
    stream: Literal["stdout", "stderr"]
    time: float | None
    line: str


class PullRequest(Wire, frozen=True):
    reference: str
    pull_policy: str = "always"


class PushRequest(Wire, frozen=True):
    reference: str
    destination: str = ""


class RegistryLogin(Wire, frozen=True):
    registry: str
    username: str
    password: str


class NodeInfo(Wire, frozen=True):
    """A node of the cluster (this node, until there are others) and its daemons."""

    name: str
    address: str
    version: str
    state: Literal["ready", "degraded"]
    daemons: list[DaemonStatus]


class Problem(Wire, frozen=True, kw_only=True):
    """An RFC 9457 problem document: every error the API answers."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class TokenCreate(Wire, frozen=True):
    name: str
    role: Literal["viewer", "operator", "admin"]
    deployments: list[str] = []  # [] reaches every deployment
    ttl_seconds: int | None = None  # None never expires


class TokenInfo(Wire, frozen=True):
    name: str
    role: Literal["viewer", "operator", "admin"]
    deployments: list[str]
    created_at: float
    expires_at: float | None
    revoked: bool = False


class TokenIssued(Wire, frozen=True):
    """The token's text, shown this once, and what it may do."""

    token: str
    info: TokenInfo


class SecretWrite(Wire, frozen=True):
    name: str
    value: str
    deployment: str = ""  # "" is a node-wide secret

    def __repr__(self) -> str:  # a value must not reach a log line by accident
        return f"SecretWrite(name={self.name!r}, deployment={self.deployment!r}, value=<hidden>)"


class SecretInfo(Wire, frozen=True):
    name: str
    deployment: str
    created_at: float
    updated_at: float
    version: int


class SecretValue(Wire, frozen=True):
    name: str
    deployment: str
    value: str

    def __repr__(self) -> str:  # a value must not reach a log line by accident
        return f"SecretValue(name={self.name!r}, deployment={self.deployment!r}, value=<hidden>)"


class RolledBack(Wire, frozen=True):
    """What a rollback did: the new revision holding the previous spec (no operation to
    follow: the scheduler rolls it out as it does any new revision)."""

    deployment: str
    revision: int
