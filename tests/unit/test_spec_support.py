"""Fields a node accepts but does not honour: refused with the fix, or warned about
(shared/spec/support.py), as `zlayerctl validate` shows them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from ctl.supervisor import find_executable
from shared.spec import load_spec
from shared.spec.support import node_support

W = "warning: shop.zlayer.yml:"
BASE = "version: v1\ndeployment: shop\nservices:\n  web:\n    image: nginx:1\n"


def spec_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "shop.zlayer.yml"
    path.write_text(BASE + "".join(f"    {line}\n" for line in extra.strip().splitlines()))
    return path


def validate(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_executable("zlayerctl"), "validate", path.name, *args],
        capture_output=True, text=True, timeout=60, cwd=path.parent,
    )  # fmt: skip


def test_supported_values_pass_quietly(tmp_path: Path) -> None:
    path = spec_file(
        tmp_path,
        "pid_mode: host\nipc_mode: shareable\nuserns_mode: host\n"
        "security_opt: [no-new-privileges, seccomp=unconfined]\nextra_groups: [audio]\n"
        "init_container: true\ncgroup_parent: /batch",
    )
    support = node_support(load_spec(path))
    assert support.refusals == [] and support.warnings == []
    result = validate(path)
    assert result.returncode == 0 and result.stderr == ""


def test_what_would_run_differently_is_named_with_the_fix(tmp_path: Path) -> None:
    path = spec_file(
        tmp_path,
        "pid_mode: container:db\nipc_mode: container:db\nuserns_mode: keep-id\n"
        "security_opt: [apparmor=docker-default]\nresources: {gpu: {count: 1}}\n"
        "init: {steps: [{id: seed, uses: init.s3_pull, with: {bucket: b}}]}\n"
        "storage: [{type: s3, bucket: data, target: /data}]",
    )
    # The file is a valid spec: validate says what `up` would refuse here, and passes.
    result = validate(path)
    assert result.returncode == 0, result.stderr
    refused = " (up refuses it on this node)"
    assert result.stderr.strip().splitlines() == [
        W + "6:5: service web: pid_mode 'container:db' is not supported; use private "
        "(the default) or host" + refused,
        W + "7:5: service web: ipc_mode 'container:db' is not supported; use private "
        "(the default), shareable, none or host" + refused,
        W + "8:5: service web: userns_mode 'keep-id' is not supported; replicas run in the "
        "host's user namespace (leave it out, or host)" + refused,
        W + "9:20: service web: security_opt 'apparmor=docker-default' would not be applied on "
        "this node (no seccomp, AppArmor or SELinux profiles are loaded); remove it, or use "
        "no-new-privileges" + refused,
        W + "11:31: service web: init step seed uses init.s3_pull, which this node does not run "
        "yet; fetch the files with an init.run step instead" + refused,
        W + "12:15: service web: s3 storage (data at /data) is not supported on this node yet; "
        "use a named volume" + refused,
        W + "10:17: service web: resources.gpu asks for GPUs, which this node does not hand out "
        "yet; remove it, or pass a device through with devices" + refused,
    ]
    as_json = json.loads(validate(path, "--format", "json").stdout)
    assert as_json["valid"] is True and len(as_json["refused_here"]) == 7


def test_what_has_no_effect_here_is_a_warning(tmp_path: Path) -> None:
    path = spec_file(
        tmp_path,
        "tty: true\nstdin_open: true\nport_mappings: [{host: 8080, container: 80}]\n"
        "node_mode: dedicated\nnode_selector: {labels: {zone: a}}\nlogs: {max_size: 10Mi}",
    )
    result = validate(path)
    assert result.returncode == 0, result.stderr
    warnings: list[Any] = [
        line for line in result.stderr.splitlines() if line.startswith("warning: ")
    ]
    assert warnings == [
        W + "6:5: service web: tty and stdin_open are not supported; the replica runs with no "
        "terminal and stdin closed (`zlayerctl exec -t` gives a command one)",
        W + "8:5: service web: port_mappings are not applied; publish a port with an endpoint "
        "(expose: public)",
        W + "9:5: service web: node_mode places replicas across a cluster; on one node it has "
        "no effect",
        W + "10:5: service web: node_selector places replicas across a cluster; on one node it "
        "has no effect",
        W + "11:5: service web: logs is accepted but not applied by this version of ZLayer",
    ]
    as_json = json.loads(validate(path, "--format", "json").stdout)
    assert as_json["valid"] is True and len(as_json["warnings"]) == 5


UPSTREAM_KEYS = """\
version: v1
deployment: shop
services:
  web:
    image: nginx:1
    endpoints:
      - name: http
        protocol: http
        port: 80
        tunnel: {enabled: true, remote_port: 8080}
    storage:
      - {type: named, name: cache, target: /cache, tier: cached}
      - {type: named, name: data, target: /data, tier: local}
    network:
      join: {mode: open}
  edge:
    image: nginx:1
    network:
      overlays: {global: {enabled: false}}
  fn:
    image: ghcr.io/example/fn:1
    service_type: wasm_http
  plain:
    image: nginx:1
    wasm: {max_instances: 4}
tunnels:
  db:
    from: node-a
    to: node-b
    local_port: 5432
    remote_port: 5432
api:
  bind: 0.0.0.0:3669
  jwt_secret: s3cret
externals:
  billing: {address: 10.0.0.9}
"""


def test_upstream_keys_are_never_dropped_in_silence(tmp_path: Path) -> None:
    path = tmp_path / "shop.zlayer.yml"
    path.write_text(UPSTREAM_KEYS)
    result = validate(path)
    assert result.returncode == 0, result.stderr
    refused = " (up refuses it on this node)"
    assert result.stderr.strip().splitlines() == [
        "warning: shop.zlayer.yml:27:3: tunnel db (node-a to node-b) connects nodes, which this "
        "node does not do; remove it (an endpoint with expose: public publishes a port here)"
        + refused,
        W + "10:9: service web: endpoint http asks for a tunnel, which this "
        "node does not open; remove `tunnel` (expose: public publishes the port on this node)"
        + refused,
        "warning: shop.zlayer.yml:19:18: service edge: network.overlays.global asks to keep this "
        "service off the network every service shares, but on this node all replicas share one "
        "bridge network; remove it" + refused,
        "warning: shop.zlayer.yml:22:5: service fn: service_type wasm_http serves HTTP on its "
        "first endpoint's target port, and this service has no endpoint; add one "
        "(protocol: http)" + refused,
        "warning: shop.zlayer.yml:32:1: api is not applied: this node's REST API is zlayer-apid, "
        "set by http_bind and http_port in apid.toml; apid has no authentication yet, so "
        "jwt_secret protects nothing",
        "warning: shop.zlayer.yml:35:1: externals is accepted but not applied by this version of "
        "ZLayer; give the services that use one its address",
        W + "12:52: service web: storage tier cached (/cache) has no effect "
        "on one node; the volume is a local directory",
        W + "14:5: service web: network overlays and join policies connect "
        "nodes; on one node they have no effect (every replica joins the node's bridge network)",
        "warning: shop.zlayer.yml:25:12: service plain: wasm.max_instances shapes the instances "
        "of a wasm_http service; it has no effect on a WASI command",
    ]
    as_json = json.loads(validate(path, "--format", "json").stdout)
    assert len(as_json["refused_here"]) == 4 and len(as_json["warnings"]) == 5
    # schedd refuses the deployment with the same sentences (no file position there).
    support = node_support(load_spec(path))
    assert [text.split(":")[0] for text in support.refusals] == [
        "tunnel db (node-a to node-b) connects nodes, which this node does not do; remove it "
        "(an endpoint with expose",
        "service web",
        "service edge",
        "service fn",
    ]


def test_upstream_defaults_pass_quietly(tmp_path: Path) -> None:
    path = spec_file(
        tmp_path,
        "network: {overlays: {service: {enabled: true, encrypted: true, isolated: true}, "
        "global: {enabled: true, encrypted: true}}, join: {mode: token, scope: service}}\n"
        "endpoints: [{name: http, protocol: http, port: 80, tunnel: {enabled: false}}]\n"
        "storage: [{type: named, name: data, target: /data, tier: local}]\n"
        "service_type: standard",
    )
    result = validate(path)
    assert result.returncode == 0 and result.stderr == ""


def test_replica_groups_count_and_their_overrides_are_named(tmp_path: Path) -> None:
    groups = "replica_groups:\n  - {role: a, count: 2}\n  - {role: b, count: 1}"
    counts = spec_file(tmp_path, groups)
    assert node_support(load_spec(counts)).warnings == []
    overrides = spec_file(tmp_path, "replica_groups:\n  - {role: a, count: 2, env: {X: '1'}}")
    assert node_support(load_spec(overrides)).warnings == [
        "service web: replica_groups: a group's own image, env and command are not applied by "
        "this version of ZLayer; every replica runs the service's (the groups' counts apply)"
    ]
