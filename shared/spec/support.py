"""What a node does with the spec's fields it accepts but cannot (or need not) honour.

The v1 spec accepts every key upstream accepts, so existing files load. A
few ask for what a single node here does not do; none of them may be
dropped in silence. :func:`node_support` sorts them into

- **refusals**: running without the field would run something other than
  what was asked (a pid namespace shared with another container, a seccomp
  profile that would not be applied): the deployment is refused, with the
  fix in the sentence;
- **warnings**: the service runs as asked in every way that matters on one
  node (placement rules, a terminal nobody attaches to): the deployment goes
  ahead and the user is told, by ``zlayerctl validate``/``up``/``deploy`` and
  by an event.

schedd, zlayerctl and agentd share this one list. Each finding keeps the path
of the key it is about, so that given the spec's text, :func:`node_support`
names the file, line and column of that key too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shared import wasm_limits
from shared.spec.checks import PathSegment
from shared.spec.models import DeploymentSpec, NetworkSpec, ServiceSpec

PID_MODES = ("private", "host")
IPC_MODES = ("private", "shareable", "host", "none")
USERNS_MODES = ("host",)
# security_opt entries that ask for no more confinement than a replica has.
UNCONFINED_OPTS = ("seccomp=unconfined", "apparmor=unconfined", "label=disable", "label:disable")
NO_NEW_PRIVILEGES = ("no-new-privileges", "no-new-privileges:true", "no-new-privileges=true")
NEW_PRIVILEGES = ("no-new-privileges:false", "no-new-privileges=false")


Path = tuple[PathSegment, ...]


@dataclass
class NodeSupport:
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # The key each sentence is about, for locating it in the file.
    paths: dict[str, Path] = field(default_factory=dict)

    def refuse(self, path: Path, message: str) -> None:
        self.refusals.append(message)
        self.paths[message] = path

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append(message)
        self.paths[message] = path

    def extend(self, other: NodeSupport) -> None:
        self.refusals += other.refusals
        self.warnings += other.warnings
        self.paths.update(other.paths)


def no_new_privileges(service: ServiceSpec) -> bool:
    """The process's no_new_privs bit: set unless privileged or asked off."""
    if any(opt in NEW_PRIVILEGES for opt in service.security_opt):
        return False
    return not service.privileged


# Upstream's service types that run a module inside its proxy, by what the module is there.
WASM_PROXY_TYPES = {
    "wasm_plugin": "a host plugin",
    "wasm_transformer": "a request and response transformer",
    "wasm_authenticator": "an authenticator of requests",
    "wasm_rate_limiter": "a rate limiter of requests",
    "wasm_middleware": "a middleware of requests",
    "wasm_router": "a router of requests",
}
# wasm settings that shape wasm_http instance pools only.
WASM_POOL_KEYS = ("min_instances", "max_instances", "idle_timeout", "request_timeout")


def _wasm_support(
    service: ServiceSpec,
    refuse: Callable[[Path, str], None],
    warn: Callable[[Path, str], None],
) -> None:
    """WebAssembly: WASI commands run (wasmtime run); what they cannot do is said."""
    kind = service.service_type
    if kind in WASM_PROXY_TYPES:
        refuse(
            ("service_type",),
            f"service_type {kind} makes the module {WASM_PROXY_TYPES[kind]} inside "
            "upstream's proxy, which this node's proxy does not load; run it as a WASI "
            "command (service_type: standard) or a container",
        )
    elif kind == "wasm_http" and not service.endpoints:
        refuse(
            ("service_type",),
            "service_type wasm_http serves HTTP on its first endpoint's target port, and "
            "this service has no endpoint; add one (protocol: http)",
        )
    wasm = service.wasm
    if wasm is None:
        return
    given = wasm.model_fields_set
    kv = [key for key in ("kv_enabled", "kv_namespace", "kv_max_value_size") if key in given]
    if wasm.kv_enabled or wasm.kv_namespace is not None or wasm.kv_max_value_size is not None:
        refuse(
            ("wasm", kv[0] if kv else "kv_enabled"),
            f"wasm.{kv[0] if kv else 'kv_enabled'} asks for upstream's key-value store, which "
            "this node does not have; remove the kv_ settings and keep the data in a volume",
        )
    if wasm.secrets:
        refuse(
            ("wasm", "secrets"),
            "wasm.secrets asks for upstream's secrets interface, which this node does not "
            "offer; remove it and pass each value to the module through env",
        )
    if wasm.allowed_hosts:
        refuse(
            ("wasm", "allowed_hosts"),
            "wasm.allowed_hosts cannot be enforced here (wasmtime's outgoing HTTP keeps no "
            "list of hosts); remove it, and leave allow_http_outgoing off to keep HTTP out",
        )
    refusal = wasm_limits.epoch_interval_refusal(service)
    if refusal:
        refuse(("wasm", "epoch_interval"), refusal)
    if not wasm.precompile:
        warn(
            ("wasm", "precompile"),
            "wasm.precompile: false is not applied; each module is compiled once per digest "
            "and replicas start from that code",
        )
    pool = [key for key in WASM_POOL_KEYS if key in given]
    if kind == "wasm_http":
        # max_instances and idle_timeout are wasmtime serve's own settings in each replica
        # (--max-concurrent-requests, --idle-instance-timeout); what they cannot do is said.
        if "min_instances" in given and wasm.min_instances > 0:
            warn(
                ("wasm", "min_instances"),
                "wasm.min_instances is not applied: wasmtime serve keeps no instances "
                "waiting, each replica loads and links the component before it listens and "
                "makes an instance per request; keep replicas running with scale",
            )
        if "idle_timeout" in given:
            warn(
                ("wasm", "idle_timeout"),
                "wasm.idle_timeout keeps an instance between requests only for a WASIp3 "
                "component; wasmtime serve gives a WASIp2 component a new instance for each "
                "request, so it has none to keep",
            )
    elif pool:
        one = len(pool) == 1
        warn(
            ("wasm", pool[0]),
            f"wasm.{', '.join(pool)} {'shapes' if one else 'shape'} the instances of a "
            f"wasm_http service; {'it has' if one else 'they have'} no effect on a WASI command",
        )


def _wasm_health_support(
    service: ServiceSpec,
    refuse: Callable[[Path, str], None],
    warn: Callable[[Path, str], None],
) -> None:
    """A command health check execs in the replica, which a WebAssembly one cannot do.

    A wasm_http service is WebAssembly: refused here. Another with wasm settings
    probably is: warned here, and agentd refuses it when the image is a module.
    """
    refusal = wasm_limits.command_check_refusal(service)
    if not refusal:
        return
    if service.service_type == "wasm_http":
        refuse(("health", "check"), refusal)
    elif service.wasm is not None:
        warn(
            ("health", "check"),
            "if this service's image is a WebAssembly module, its command health check "
            "cannot run and agentd refuses it (the replica's root holds the module and "
            "wasmtime, with no commands to run); use an http or tcp check",
        )


def service_support(name: str, service: ServiceSpec) -> NodeSupport:
    found = NodeSupport()
    base: Path = ("services", name)

    def refuse(key: Path, message: str) -> None:
        found.refuse((*base, *key), f"service {name}: {message}")

    def warn(key: Path, message: str) -> None:
        found.warn((*base, *key), f"service {name}: {message}")

    if service.pid_mode not in (None, "", *PID_MODES):
        refuse(
            ("pid_mode",),
            f"pid_mode {service.pid_mode!r} is not supported; use private (the default) or host",
        )
    if service.ipc_mode not in (None, "", *IPC_MODES):
        refuse(
            ("ipc_mode",),
            f"ipc_mode {service.ipc_mode!r} is not supported; use private "
            "(the default), shareable, none or host",
        )
    if service.userns_mode not in (None, "", *USERNS_MODES):
        refuse(
            ("userns_mode",),
            f"userns_mode {service.userns_mode!r} is not supported; replicas "
            "run in the host's user namespace (leave it out, or host)",
        )
    for index, opt in enumerate(service.security_opt):
        if opt in UNCONFINED_OPTS or opt in NO_NEW_PRIVILEGES or opt in NEW_PRIVILEGES:
            continue
        refuse(
            ("security_opt", index),
            f"security_opt {opt!r} would not be applied on this node (no "
            "seccomp, AppArmor or SELinux profiles are loaded); remove it, or use "
            "no-new-privileges",
        )
    for index, step in enumerate(service.init.steps):
        if step.uses in ("init.s3_pull", "init.s3_push"):
            refuse(
                ("init", "steps", index, "uses"),
                f"init step {step.id} uses {step.uses}, which this node does "
                "not run yet; fetch the files with an init.run step instead",
            )
    for index, item in enumerate(service.storage):
        if item.type == "s3":
            refuse(
                ("storage", index),
                f"s3 storage ({item.bucket} at {item.target}) is not supported "
                "on this node yet; use a named volume",
            )
        elif item.type in ("named", "anonymous") and item.tier != "local":
            warn(
                ("storage", index, "tier"),
                f"storage tier {item.tier} ({item.target}) has no effect on one node; "
                "the volume is a local directory",
            )
    if service.resources.gpu is not None:
        refuse(
            ("resources", "gpu"),
            "resources.gpu asks for GPUs, which this node does not hand out "
            "yet; remove it, or pass a device through with devices",
        )
    for index, endpoint in enumerate(service.endpoints):
        if endpoint.tunnel is not None and endpoint.tunnel.enabled:
            refuse(
                ("endpoints", index, "tunnel"),
                f"endpoint {endpoint.name} asks for a tunnel, which this node does not "
                "open; remove `tunnel` (expose: public publishes the port on this node)",
            )
    _network_support(service.network, refuse, warn)
    _wasm_support(service, refuse, warn)
    _wasm_health_support(service, refuse, warn)
    if service.service_type == "job" and service.rtype != "job":
        warn(
            ("service_type",),
            "service_type job is not applied; a service that runs to completion is `rtype: job`",
        )
    if service.tty or service.stdin_open:
        which = " and ".join(
            key for key, on in (("tty", service.tty), ("stdin_open", service.stdin_open)) if on
        )
        warn(
            ("tty" if service.tty else "stdin_open",),
            f"{which} {'are' if ' and ' in which else 'is'} not supported; "
            "the replica runs with no terminal and stdin closed "
            "(`zlayerctl exec -t` gives a command one)",
        )
    if service.port_mappings:
        warn(
            ("port_mappings",),
            "port_mappings are not applied; publish a port with an endpoint (expose: public)",
        )
    for key, value, default in (
        ("node_mode", service.node_mode, "shared"),
        ("node_selector", service.node_selector, None),
        ("affinity", service.affinity, None),
    ):
        if value not in (default, None, [], {}):
            warn((key,), f"{key} places replicas across a cluster; on one node it has no effect")
    # The groups' counts make the service's (their sum, on one node too); their own
    # image, env and command would make replicas of one service differ.
    if any(g.image or g.env or g.command for g in service.replica_groups or ()):
        warn(
            ("replica_groups",),
            "replica_groups: a group's own image, env and command are not applied by this "
            "version of ZLayer; every replica runs the service's (the groups' counts apply)",
        )
    for key in ("lifecycle", "isolation", "logs", "overlay", "localhost_reachability", "platform"):
        if getattr(service, key) is not None:
            warn((key,), f"{key} is accepted but not applied by this version of ZLayer")
    return found


Report = Callable[[Path, str], None]  # refuse(key, message) or warn(key, message)


def _network_support(network: NetworkSpec, refuse: Report, warn: Report) -> None:
    """Overlays and join policies: one node has one bridge network that every replica joins."""
    shared = network.overlays.global_
    if not shared.enabled or shared.isolated:
        # Asked to be kept apart from the other services: on one bridge it would not be.
        refuse(
            ("network", "overlays", "global"),
            "network.overlays.global asks to keep this service off the network every service "
            "shares, but on this node all replicas share one bridge network; remove it",
        )
    elif network != NetworkSpec():
        warn(
            ("network",),
            "network overlays and join policies connect nodes; on one node they have no "
            "effect (every replica joins the node's bridge network)",
        )


def deployment_support(spec: DeploymentSpec) -> NodeSupport:
    """What the top level asks (tunnels, api, externals) that a node does not do."""
    found = NodeSupport()
    for name, tunnel in spec.tunnels.items():
        found.refuse(
            ("tunnels", name),
            f"tunnel {name} ({tunnel.from_} to {tunnel.to}) connects nodes, which this node "
            "does not do; remove it (an endpoint with expose: public publishes a port here)",
        )
    if "api" in spec.model_fields_set:
        message = (
            "api is not applied: this node's REST API is zlayer-apid, set by http_bind and "
            "http_port in apid.toml"
        )
        if spec.api.jwt_secret:
            message += "; apid has no authentication yet, so jwt_secret protects nothing"
        found.warn(("api",), message)
    if spec.externals:
        found.warn(
            ("externals",),
            "externals is accepted but not applied by this version of ZLayer; give the "
            "services that use one its address",
        )
    return found


def node_support(
    spec: DeploymentSpec, text: str | bytes | None = None, filename: str = "<spec>"
) -> NodeSupport:
    """Every refusal and warning of the deployment and each service, in the spec's order.

    Given the spec's ``text``, each sentence starts with the file, line and
    column of the key it is about.
    """
    found = deployment_support(spec)
    for name, service in spec.services.items():
        found.extend(service_support(name, service))
    if text is not None and (found.refusals or found.warnings):
        found = _located(found, text, filename)
    return found


def _located(found: NodeSupport, text: str | bytes, filename: str) -> NodeSupport:
    from shared.spec.located_yaml import LocatedYaml

    document = LocatedYaml(filename, "deployment spec", "")
    decoded = text.decode("utf-8-sig", "replace") if isinstance(text, bytes) else text
    document.load(decoded)
    located = NodeSupport()
    for sentences, add in ((found.refusals, located.refuse), (found.warnings, located.warn)):
        for sentence in sentences:
            path = found.paths[sentence]
            line, column = document.mark(path, at_key=True)
            add(path, f"{filename}:{line}:{column}: {sentence}")
    return located
