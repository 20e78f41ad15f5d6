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

schedd, zlayerctl and agentd share this one list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.spec.models import DeploymentSpec, ServiceSpec

PID_MODES = ("private", "host")
IPC_MODES = ("private", "shareable", "host", "none")
USERNS_MODES = ("host",)
# security_opt entries that ask for no more confinement than a replica has.
UNCONFINED_OPTS = ("seccomp=unconfined", "apparmor=unconfined", "label=disable", "label:disable")
NO_NEW_PRIVILEGES = ("no-new-privileges", "no-new-privileges:true", "no-new-privileges=true")
NEW_PRIVILEGES = ("no-new-privileges:false", "no-new-privileges=false")


@dataclass
class NodeSupport:
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def no_new_privileges(service: ServiceSpec) -> bool:
    """The process's no_new_privs bit: set unless privileged or asked off."""
    if any(opt in NEW_PRIVILEGES for opt in service.security_opt):
        return False
    return not service.privileged


def service_support(name: str, service: ServiceSpec) -> NodeSupport:
    found = NodeSupport()
    refuse, warn = found.refusals.append, found.warnings.append
    if service.pid_mode not in (None, "", *PID_MODES):
        refuse(
            f"service {name}: pid_mode {service.pid_mode!r} is not supported; use private "
            "(the default) or host"
        )
    if service.ipc_mode not in (None, "", *IPC_MODES):
        refuse(
            f"service {name}: ipc_mode {service.ipc_mode!r} is not supported; use private "
            "(the default), shareable, none or host"
        )
    if service.userns_mode not in (None, "", *USERNS_MODES):
        refuse(
            f"service {name}: userns_mode {service.userns_mode!r} is not supported; replicas "
            "run in the host's user namespace (leave it out, or host)"
        )
    for opt in service.security_opt:
        if opt in UNCONFINED_OPTS or opt in NO_NEW_PRIVILEGES or opt in NEW_PRIVILEGES:
            continue
        refuse(
            f"service {name}: security_opt {opt!r} would not be applied on this node (no "
            "seccomp, AppArmor or SELinux profiles are loaded); remove it, or use "
            "no-new-privileges"
        )
    for step in service.init.steps:
        if step.uses in ("init.s3_pull", "init.s3_push"):
            refuse(
                f"service {name}: init step {step.id} uses {step.uses}, which this node does "
                "not run yet; fetch the files with an init.run step instead"
            )
    for item in service.storage:
        if item.type == "s3":
            refuse(
                f"service {name}: s3 storage ({item.bucket} at {item.target}) is not supported "
                "on this node yet; use a named volume"
            )
    if service.resources.gpu is not None:
        refuse(
            f"service {name}: resources.gpu asks for GPUs, which this node does not hand out "
            "yet; remove it, or pass a device through with devices"
        )
    if service.tty or service.stdin_open:
        which = " and ".join(
            key for key, on in (("tty", service.tty), ("stdin_open", service.stdin_open)) if on
        )
        warn(
            f"service {name}: {which} {'are' if ' and ' in which else 'is'} not supported; "
            "the replica runs with no terminal and stdin closed "
            "(`zlayerctl exec -t` gives a command one)"
        )
    if service.port_mappings:
        warn(
            f"service {name}: port_mappings are not applied; publish a port with an endpoint "
            "(expose: public)"
        )
    for key, value, default in (
        ("node_mode", service.node_mode, "shared"),
        ("node_selector", service.node_selector, None),
        ("affinity", service.affinity, None),
        ("replica_groups", service.replica_groups, None),
    ):
        if value not in (default, None, [], {}):
            effect = "places replicas across a cluster; on one node it has no effect"
            warn(f"service {name}: {key} {effect}")
    for key in ("lifecycle", "isolation", "logs", "overlay", "localhost_reachability", "platform"):
        if getattr(service, key) is not None:
            warn(f"service {name}: {key} is accepted but not applied by this version of ZLayer")
    return found


def node_support(spec: DeploymentSpec) -> NodeSupport:
    """Every refusal and warning of every service, in the spec's order."""
    found = NodeSupport()
    for name, service in spec.services.items():
        one = service_support(name, service)
        found.refusals += one.refusals
        found.warnings += one.warnings
    return found
