"""The v1 deployment spec as pydantic models, field for field with upstream ZLayer.

Owns the shape of a ``*.zlayer.yml`` file: every model forbids unknown keys,
primitive fields are strict (a quoted ``"80"`` is not a port), and the
shorthands upstream files use are normalised on the way in (``image: nginx:1``,
env as a list of ``{name, value}``, ``expose: true``, ``command: [...]``,
``capabilities``/``cap_add``, ``wasm``/``wasm_http``, ``host_network``).

Cross-service rules (depends targets and cycles, unique endpoint names, cron
schedules) live in :mod:`shared.spec.checks`; :class:`DeploymentSpec` runs them
after validation so a spec built in Python is held to the same rules.

A few service keys upstream accepts are not pinned down in SPEC-NOTES
(``lifecycle``, ``isolation``, ``platform``, ``logs``, ``overlay``,
``localhost_reachability``, ``port_mappings``, top-level ``externals``): they
are accepted with a loose JSON-like type and passed through, rather than
guessed at. ``affinity`` and ``replica_groups`` take upstream's shapes
(``spread`` | ``pack`` | ``{pin: "key=value"}``; a list of ``{role, count,
image, env, command, resources, affinity}``), as placement reads them.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonDict  # type: ignore[attr-defined]

from shared.spec.limits import MAX_REPLICAS, MAX_SERVICES
from shared.spec.quantities import Duration, Size

MAX_CPUS = 4096  # cores one replica may be limited to; a cgroup quota must stay finite

__all__ = [
    "SERVICE_KEYS",
    "AdaptiveScale",
    "Affinity",
    "AffinityPin",
    "AnonymousStorage",
    "ApiSpec",
    "BindStorage",
    "CommandCheck",
    "CommandSpec",
    "DependsSpec",
    "DeploymentSpec",
    "DeviceSpec",
    "EndpointSpec",
    "ErrorsSpec",
    "FixedScale",
    "GpuSpec",
    "HealthCheck",
    "HealthSpec",
    "HttpCheck",
    "ImageSpec",
    "InitSpec",
    "InitStep",
    "ManualScale",
    "NamedStorage",
    "NetworkSpec",
    "NodeSelector",
    "ReplicaGroup",
    "ResourcesSpec",
    "RestartPolicy",
    "S3Storage",
    "ScaleSpec",
    "ServiceSpec",
    "StorageSpec",
    "TcpCheck",
    "TmpfsStorage",
    "TunnelDefinition",
    "WasmConfig",
    "check_schedule",
    "check_value_refs",
]


class SpecModel(BaseModel):
    """Base for every spec model: unknown keys are errors, types are not coerced."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        populate_by_name=True,
        defer_build=True,
        allow_inf_nan=False,
    )


# ---------------------------------------------------------------- scalar types


def _port_in_range(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be between 1 and 65535")
    return value


Port = Annotated[
    int,
    AfterValidator(_port_in_range),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535}),
]

_DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _dns_name(value: str) -> str:
    if not _DNS_NAME.fullmatch(value):  # not match: `$` would let a trailing newline through
        raise ValueError(
            f"{value!r} is not a DNS-safe name: use 1-63 lowercase letters, digits and "
            "hyphens, starting and ending with a letter or digit"
        )
    return value


DnsName = Annotated[
    str,
    AfterValidator(_dns_name),
    WithJsonSchema({"type": "string", "pattern": _DNS_NAME.pattern}),
]


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty), Field(min_length=1)]

# Whole numbers the spec does not bound otherwise still fit the 64-bit integers
# of the bus, the store and the kernel interfaces they end up in.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]

# `$E:VAR` names a variable of the deploying host; `$S:name` or
# `$S:@service/name` names a secret. Both may sit inside a longer value
# (upstream writes `postgresql://user:$E:PASSWORD@db:5432/app`).
_REF_START = re.compile(r"\$([ES]):")
_ENV_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_SECRET_REF = re.compile(rf"(@{_SECRET_NAME}/{_SECRET_NAME}|{_SECRET_NAME})")


def check_value_refs(value: str) -> str:
    """Refuse a malformed ``$E:`` or ``$S:`` reference anywhere in ``value``."""
    for match in _REF_START.finditer(value):
        rest = value[match.end() :]
        if match.group(1) == "E":
            if not _ENV_REF.match(rest):
                raise ValueError(
                    f"`$E:` at offset {match.start()} must be followed by a variable name "
                    "(letters, digits, _), e.g. $E:DATABASE_URL"
                )
        else:
            ref = _SECRET_REF.match(rest)
            if ref is None or (rest.startswith("@") and "/" not in ref.group(0)):
                raise ValueError(
                    f"`$S:` at offset {match.start()} must be followed by a secret name, "
                    "e.g. $S:db-password or $S:@service/db-password"
                )
    return value


def _scalar_to_str(value: Any) -> Any:
    """Env-like values: YAML reads `8080` and `true` as numbers and booleans;
    upstream reads them as the string written, so do the same."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


_SCALAR_SCHEMA: JsonDict = {"type": ["string", "number", "boolean"]}
EnvValue = Annotated[
    str,
    BeforeValidator(_scalar_to_str),
    AfterValidator(check_value_refs),
    WithJsonSchema(_SCALAR_SCHEMA),
]
LabelValue = Annotated[str, BeforeValidator(_scalar_to_str), WithJsonSchema(_SCALAR_SCHEMA)]


def _env_list_to_map(value: Any) -> Any:
    """The README's list form `[{name: A, value: b}]` becomes `{A: b}`."""
    if not isinstance(value, list):
        return value
    result: dict[str, Any] = {}
    for index, item in enumerate(value):
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"item {index} must be a mapping with `name` and `value`")
        unknown = sorted(str(key) for key in item if key not in ("name", "value"))
        if unknown:
            raise ValueError(f"item {index} has unknown key `{unknown[0]}` (expected name, value)")
        name = item["name"]
        if not isinstance(name, str):
            raise ValueError(f"item {index}: `name` must be a string")
        if name in result:
            raise ValueError(f"item {index}: `{name}` is set twice")
        result[name] = item.get("value", "")
    return result


def _env_name(value: str) -> str:
    if not value or "=" in value or "\0" in value:
        raise ValueError(f"{value!r} is not a usable environment variable name")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]
EnvMap = Annotated[dict[EnvName, EnvValue], BeforeValidator(_env_list_to_map)]

# Upstream's shape for these is not fixed by SPEC-NOTES: accepted and passed on.
JsonValue = Any
Opaque = dict[str, JsonValue]


def check_schedule(value: str) -> str:
    """Accept 5-field cron, or 6/7 fields with seconds first (7th: year)."""
    fields = value.split()
    if len(fields) not in (5, 6, 7):
        raise ValueError(
            f"a cron schedule has 5, 6 or 7 fields, this one has {len(fields)}; "
            'e.g. "0 3 * * *" or upstream\'s "0 0 3 * * * *"'
        )
    seconds_first = len(fields) > 5
    from croniter import croniter  # with the first cron schedule, not with the models

    try:
        valid = croniter.is_valid(value, second_at_beginning=seconds_first)
    except Exception:  # croniter raises a variety of types on odd input
        valid = False
    if not valid:
        layout = {
            5: "minute hour day-of-month month day-of-week",
            6: "second minute hour day-of-month month day-of-week",
            7: "second minute hour day-of-month month day-of-week year",
        }[len(fields)]
        raise ValueError(f"{value!r} is not a valid cron schedule ({layout})")
    try:
        croniter(value, second_at_beginning=seconds_first, max_years_between_matches=50).get_next()
    except Exception as exc:
        raise ValueError(f"{value!r} never fires") from exc
    return value


Schedule = Annotated[str, AfterValidator(check_schedule)]


# ---------------------------------------------------------------- image, command


PullPolicy = Literal["always", "newer", "if_not_present", "never"]
SourcePolicy = Literal["local_first", "remote_only", "local_only"]


class ImageSpec(SpecModel):
    """The image to run; ``image: nginx:1`` is shorthand for ``{name: nginx:1}``."""

    name: NonEmptyStr
    pull_policy: PullPolicy = "if_not_present"
    source_policy: SourcePolicy | None = None


def _image_shorthand(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class CommandSpec(SpecModel):
    """Overrides of the image's ENTRYPOINT, CMD and working directory."""

    entrypoint: list[str] | None = None
    args: list[str] | None = None
    workdir: str | None = None


def _command_shorthand(value: Any) -> Any:
    """`command: [a, b]` (compose habit, upstream's python example) overrides CMD."""
    return {"args": value} if isinstance(value, list) else value


# ---------------------------------------------------------------- resources


class GpuSpec(SpecModel):
    count: Annotated[int, Field(ge=1, le=1024)] = 1
    vendor: str = "nvidia"
    mode: str | None = None
    model: str | None = None
    sharing: str | None = None
    scheduling: str | None = None


class ResourcesSpec(SpecModel):
    """Upper limits for one replica."""

    cpu: Annotated[float, Field(gt=0, le=MAX_CPUS)] | None = None
    memory: Size | None = None
    gpu: GpuSpec | None = None
    pids_limit: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None


# ---------------------------------------------------------------- endpoints


Protocol = Literal["http", "https", "tcp", "udp", "websocket"]
Expose = Literal["public", "internal"]


def _expose_bool(value: Any) -> Any:
    """The README writes `expose: true`; read it as public (false: internal)."""
    if value is True:
        return "public"
    if value is False:
        return "internal"
    return value


ExposeField = Annotated[
    Expose,
    BeforeValidator(_expose_bool),
    WithJsonSchema({"anyOf": [{"enum": ["public", "internal"]}, {"type": "boolean"}]}),
]


class TcpConnectProbe(SpecModel):
    type: Literal["tcp_connect"]


class UdpProbe(SpecModel):
    type: Literal["udp_probe"]
    request: str
    expect: str | None = None


StreamHealthCheck = Annotated[TcpConnectProbe | UdpProbe, Field(discriminator="type")]


class StreamConfig(SpecModel):
    """L4 proxy settings for tcp and udp endpoints."""

    tls: bool = False
    proxy_protocol: bool = False
    session_timeout: Duration | None = None
    health_check: StreamHealthCheck | None = None


class TunnelAccess(SpecModel):
    enabled: bool = False
    max_ttl: Duration | None = None
    audit: bool = False


class EndpointTunnel(SpecModel):
    enabled: bool = False
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    remote_port: Annotated[int, Field(ge=0, le=65535)] = 0
    expose: ExposeField | None = None
    access: TunnelAccess | None = None


class EndpointSpec(SpecModel):
    """A port the proxy binds for this service."""

    name: NonEmptyStr
    protocol: Protocol
    port: Port
    target_port: Port | None = None
    path: str | None = None
    host: str | None = None
    expose: ExposeField = "internal"
    stream: StreamConfig | None = None
    tunnel: EndpointTunnel | None = None


# ---------------------------------------------------------------- scale


class ScaleTargets(SpecModel):
    cpu: Annotated[float, Field(gt=0, le=100)] | None = None
    memory: Annotated[float, Field(gt=0, le=100)] | None = None
    rps: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None


class AdaptiveScale(SpecModel):
    """Between ``min`` and ``max`` replicas, driven by ``targets``."""

    mode: Literal["adaptive"] = "adaptive"
    min: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = 1
    max: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 10
    cooldown: Duration = timedelta(seconds=30)
    targets: ScaleTargets = Field(default_factory=ScaleTargets)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> AdaptiveScale:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class FixedScale(SpecModel):
    mode: Literal["fixed"]
    replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)]


class ManualScale(SpecModel):
    mode: Literal["manual"]


ScaleSpec = Annotated[AdaptiveScale | FixedScale | ManualScale, Field(discriminator="mode")]


# ---------------------------------------------------------------- depends, health


class DependsSpec(SpecModel):
    """Wait for another service of this deployment before starting."""

    service: NonEmptyStr
    condition: Literal["started", "healthy", "ready"] = "healthy"
    timeout: Duration = timedelta(seconds=300)
    on_timeout: Literal["fail", "warn", "continue"] = "fail"


class TcpCheck(SpecModel):
    """Connect to ``port``; no port means the first endpoint's."""

    type: Literal["tcp"]
    port: Port | None = None


class HttpCheck(SpecModel):
    """GET ``url``; a relative url ("/health") means the replica's first endpoint."""

    type: Literal["http"]
    url: NonEmptyStr
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200


class CommandCheck(SpecModel):
    type: Literal["command"]
    command: NonEmptyStr | list[str]


HealthCheck = Annotated[TcpCheck | HttpCheck | CommandCheck, Field(discriminator="type")]


class HealthSpec(SpecModel):
    """How to tell a replica is healthy; absent means TCP on the first endpoint."""

    start_grace: Duration | None = None
    interval: Duration | None = None
    timeout: Duration | None = None
    retries: Count = 3
    check: HealthCheck


def _default_health() -> HealthSpec:
    return HealthSpec(check=TcpCheck(type="tcp"))


# ---------------------------------------------------------------- init, errors, restart


class InitStep(SpecModel):
    id: NonEmptyStr
    uses: Literal["init.wait_tcp", "init.wait_http", "init.run", "init.s3_pull", "init.s3_push"]
    with_: Opaque = Field(default_factory=dict, alias="with")
    retry: Count | None = None
    timeout: Duration | None = None
    on_failure: Literal["fail", "warn", "continue"] = "fail"


class InitSpec(SpecModel):
    steps: list[InitStep] = Field(default_factory=list)


class InitFailurePolicy(SpecModel):
    action: Literal["fail", "restart", "backoff"] = "fail"


class PanicPolicy(SpecModel):
    action: Literal["restart", "shutdown", "isolate"] = "restart"


class ErrorsSpec(SpecModel):
    on_init_failure: InitFailurePolicy = Field(default_factory=InitFailurePolicy)
    on_panic: PanicPolicy = Field(default_factory=PanicPolicy)


def _yaml_no(value: Any) -> Any:
    """YAML 1.1 reads a bare `no` as false; `kind: no` means the policy "no"."""
    return "no" if value is False else value


class RestartPolicy(SpecModel):
    kind: Annotated[
        Literal["no", "always", "unless_stopped", "on_failure"], BeforeValidator(_yaml_no)
    ]
    max_attempts: Count | None = None
    delay: Duration | None = None


# ---------------------------------------------------------------- storage, devices

StorageTier = Literal["local", "cached", "network"]


class BindStorage(SpecModel):
    type: Literal["bind"]
    source: NonEmptyStr
    target: NonEmptyStr
    readonly: bool = False


class NamedStorage(SpecModel):
    type: Literal["named"]
    name: NonEmptyStr
    target: NonEmptyStr
    readonly: bool = False
    tier: StorageTier = "local"
    size: Size | None = None


class AnonymousStorage(SpecModel):
    type: Literal["anonymous"]
    target: NonEmptyStr
    tier: StorageTier = "local"


class TmpfsStorage(SpecModel):
    type: Literal["tmpfs"]
    target: NonEmptyStr
    size: Size | None = None
    mode: Annotated[int, Field(ge=0, le=0o7777)] | None = None


class S3Storage(SpecModel):
    type: Literal["s3"]
    bucket: NonEmptyStr
    prefix: str | None = None
    target: NonEmptyStr
    readonly: bool = False
    endpoint: str | None = None
    credentials: str | None = None


StorageSpec = Annotated[
    BindStorage | NamedStorage | AnonymousStorage | TmpfsStorage | S3Storage,
    Field(discriminator="type"),
]


class DeviceSpec(SpecModel):
    path: NonEmptyStr
    read: bool = True
    write: bool = True
    mknod: bool = False


class Ulimit(SpecModel):
    soft: Int64
    hard: Int64


# ---------------------------------------------------------------- placement, network


class NodeSelector(SpecModel):
    labels: dict[str, LabelValue] = Field(default_factory=dict)
    prefer_labels: dict[str, LabelValue] = Field(default_factory=dict)


def _pin_selector(value: str) -> str:
    key, eq, wanted = value.partition("=")
    if not eq or not key.strip() or not wanted.strip():
        raise ValueError(
            f"{value!r} is not a pin: write `id=NODE` for one node or `key=value` for a label"
        )
    return value


class AffinityPin(SpecModel):
    """``affinity: {pin: "zone=eu"}``: only nodes with that label (or ``id=NODE``: that node)."""

    pin: Annotated[str, AfterValidator(_pin_selector)]


def _affinity_kind(value: Any) -> str:
    return "pin" if isinstance(value, dict | AffinityPin) else "name"


# Upstream's GroupAffinity: spread over nodes, pack onto the fewest, or pin. The
# discriminator keeps a wrong value to one error, from the form it was written in.
Affinity = Annotated[
    Annotated[Literal["spread", "pack"], Tag("name")] | Annotated[AffinityPin, Tag("pin")],
    Discriminator(_affinity_kind),
]

_ROLE = re.compile(r"^[a-z]([a-z0-9-]{0,28}[a-z0-9])?$")


def _role_name(value: str) -> str:
    if not _ROLE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a role name: use 1-30 lowercase letters, digits and hyphens, "
            "starting with a letter and ending with a letter or digit"
        )
    return value


class ReplicaGroup(SpecModel):
    """One named group of a service's replicas, with its own count and overrides."""

    role: Annotated[str, AfterValidator(_role_name)]
    count: Annotated[int, Field(ge=1, le=MAX_REPLICAS)]
    image: Annotated[ImageSpec, BeforeValidator(_image_shorthand)] | None = None
    env: EnvMap = Field(default_factory=dict)  # merged over the service's env
    command: Annotated[CommandSpec, BeforeValidator(_command_shorthand)] | None = None
    resources: ResourcesSpec | None = None
    affinity: Affinity = "spread"


def _unique_roles(groups: list[ReplicaGroup] | None) -> list[ReplicaGroup] | None:
    seen: set[str] = set()
    for group in groups or ():
        if group.role in seen:
            raise ValueError(f"role `{group.role}` is used by two replica groups")
        seen.add(group.role)
    return groups


class OverlaySettings(SpecModel):
    enabled: bool = True
    encrypted: bool = True
    isolated: bool = False


class OverlayConfig(SpecModel):
    service: OverlaySettings = Field(default_factory=lambda: OverlaySettings(isolated=True))
    global_: OverlaySettings = Field(default_factory=OverlaySettings, alias="global")


class JoinPolicy(SpecModel):
    mode: Literal["open", "token", "closed"] = "token"
    scope: Literal["service", "global"] = "service"


class NetworkSpec(SpecModel):
    overlays: OverlayConfig = Field(default_factory=OverlayConfig)
    join: JoinPolicy = Field(default_factory=JoinPolicy)


# ---------------------------------------------------------------- wasm

ServiceType = Literal[
    "standard",
    "wasm_http",
    "wasm_plugin",
    "wasm_transformer",
    "wasm_authenticator",
    "wasm_rate_limiter",
    "wasm_middleware",
    "wasm_router",
    "job",
]


class WasmPreopen(SpecModel):
    source: NonEmptyStr
    target: NonEmptyStr
    readonly: bool = False


class WasmConfig(SpecModel):
    """Instance pooling and limits for WebAssembly services."""

    min_instances: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = 0
    max_instances: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 10
    idle_timeout: Duration = timedelta(minutes=5)
    request_timeout: Duration = timedelta(seconds=30)
    max_memory: Size | None = None
    max_fuel: Count | None = None
    epoch_interval: Duration | None = None
    # Capabilities: every one off unless the spec grants it.
    allow_http_outgoing: bool = False
    allowed_hosts: list[NonEmptyStr] = Field(default_factory=list)
    allow_tcp: bool = False
    allow_udp: bool = False
    preopens: list[WasmPreopen] = Field(default_factory=list)
    # Upstream's key-value store and secrets (refused at deploy: no store here).
    kv_enabled: bool = False
    kv_namespace: NonEmptyStr | None = None
    kv_max_value_size: Count | None = None
    secrets: list[NonEmptyStr] = Field(default_factory=list)
    precompile: bool = True


# ---------------------------------------------------------------- service

# Accepted spellings that fold into another field before validation.
KEY_ALIASES: dict[str, str] = {"cap_add": "capabilities", "wasm_http": "wasm"}


def _service_schema_extra(schema: JsonDict, cls: type[Any]) -> None:
    """Let editors accept the shorthands and aliases the validator accepts."""
    props = schema["properties"]
    assert isinstance(props, dict)
    props["image"] = {"anyOf": [{"type": "string", "minLength": 1}, props["image"]]}
    props["command"] = {"anyOf": [{"type": "array", "items": {"type": "string"}}, props["command"]]}
    env_list: JsonDict = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "value": _SCALAR_SCHEMA},
            "required": ["name"],
            "additionalProperties": False,
        },
    }
    props["env"] = {"anyOf": [props["env"], env_list]}
    for alias, field in KEY_ALIASES.items():
        props[alias] = props[field]
    props["host_network"] = {"type": "boolean"}


class ServiceSpec(SpecModel):
    """One service (or job, or cron job) of a deployment."""

    model_config = ConfigDict(json_schema_extra=_service_schema_extra)

    rtype: Literal["service", "job", "cron"] = "service"
    schedule: Schedule | None = None
    image: Annotated[ImageSpec, BeforeValidator(_image_shorthand)]
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    env: EnvMap = Field(default_factory=dict)
    command: Annotated[CommandSpec, BeforeValidator(_command_shorthand)] = Field(
        default_factory=CommandSpec
    )
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    endpoints: list[EndpointSpec] = Field(default_factory=list)
    scale: ScaleSpec = Field(default_factory=AdaptiveScale)
    replica_groups: Annotated[list[ReplicaGroup] | None, AfterValidator(_unique_roles)] = None
    depends: list[DependsSpec] = Field(default_factory=list)
    health: HealthSpec = Field(default_factory=_default_health)
    init: InitSpec = Field(default_factory=InitSpec)
    errors: ErrorsSpec = Field(default_factory=ErrorsSpec)
    lifecycle: Opaque | None = None
    isolation: JsonValue = None
    devices: list[DeviceSpec] = Field(default_factory=list)
    storage: list[StorageSpec] = Field(default_factory=list)
    port_mappings: list[JsonValue] = Field(default_factory=list)
    capabilities: list[str] = Field(default_factory=list)
    cap_drop: list[str] = Field(default_factory=list)
    privileged: bool = False
    node_mode: Literal["shared", "dedicated", "exclusive"] = "shared"
    node_selector: NodeSelector | None = None
    affinity: Affinity | None = None
    platform: JsonValue = None
    service_type: ServiceType = "standard"
    wasm: WasmConfig | None = None
    logs: JsonValue = None
    hostname: str | None = None
    dns: list[str] = Field(default_factory=list)
    extra_hosts: list[str] = Field(default_factory=list)
    restart_policy: RestartPolicy | None = None
    labels: dict[str, LabelValue] = Field(default_factory=dict)
    user: LabelValue | None = None
    stop_signal: str | None = None
    stop_grace_period: Duration | None = None
    sysctls: dict[str, LabelValue] = Field(default_factory=dict)
    ulimits: dict[str, Ulimit | Int64] = Field(default_factory=dict)
    security_opt: list[str] = Field(default_factory=list)
    pid_mode: str | None = None
    ipc_mode: str | None = None
    network_mode: str | None = None
    extra_groups: list[str] = Field(default_factory=list)
    read_only_root_fs: bool = False
    init_container: bool | None = None
    tty: bool = False
    stdin_open: bool = False
    userns_mode: str | None = None
    cgroup_parent: str | None = None
    expose: list[Port | str] = Field(default_factory=list)
    overlay: JsonValue = None
    localhost_reachability: JsonValue = None

    @model_validator(mode="before")
    @classmethod
    def _fold_aliases(cls, data: Any) -> Any:
        """cap_add -> capabilities, wasm_http -> wasm, host_network -> network_mode.

        When both spellings are given the alias is dropped here and the clash is
        reported by the semantic checks, so other errors are still collected.
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for alias, field in KEY_ALIASES.items():
            if alias in data:
                value = data.pop(alias)
                data.setdefault(field, value)
        if "host_network" in data:
            host = data.pop("host_network")
            if host is True and data.get("network_mode") is None:
                data["network_mode"] = "host"
        return data


SERVICE_KEYS: frozenset[str] = frozenset(
    [
        *(f.alias or name for name, f in ServiceSpec.model_fields.items()),
        *KEY_ALIASES,
        "host_network",
    ]
)
"""Every key a service mapping may hold (fields, aliases and host_network)."""


# ---------------------------------------------------------------- top level


class TunnelDefinition(SpecModel):
    """A node-to-node tunnel not tied to a service endpoint."""

    from_: NonEmptyStr = Field(alias="from")
    to: NonEmptyStr
    local_port: Port
    remote_port: Port
    protocol: Literal["tcp", "udp"] = "tcp"
    expose: ExposeField = "internal"


class ApiSpec(SpecModel):
    enabled: bool = True
    bind: str = "0.0.0.0:3669"
    jwt_secret: Annotated[str, AfterValidator(check_value_refs)] | None = None
    swagger: bool = True


class DeploymentSpec(SpecModel):
    """A whole ``*.zlayer.yml`` file."""

    version: Literal["v1"]
    deployment: DnsName
    services: Annotated[dict[str, ServiceSpec], Field(max_length=MAX_SERVICES)] = Field(
        default_factory=dict
    )
    externals: Opaque = Field(default_factory=dict)
    tunnels: dict[str, TunnelDefinition] = Field(default_factory=dict)
    api: ApiSpec = Field(default_factory=ApiSpec)

    @model_validator(mode="after")
    def _semantics(self, info: ValidationInfo) -> DeploymentSpec:
        # The loader runs these checks itself on the raw document (with exact
        # line numbers) and says so through the context, to avoid reporting twice.
        if isinstance(info.context, dict) and info.context.get("semantics_checked"):
            return self
        from shared.spec.checks import semantic_problems

        problems = semantic_problems(self.model_dump(by_alias=True))
        if problems:
            raise ValueError("; ".join(p.describe() for p in problems))
        return self

    def service_names(self) -> list[str]:
        return list(self.services)
