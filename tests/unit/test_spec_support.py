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

BASE = "version: v1\ndeployment: shop\nservices:\n  web:\n    image: nginx:1\n"


def spec_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "shop.zlayer.yml"
    path.write_text(BASE + "".join(f"    {line}\n" for line in extra.strip().splitlines()))
    return path


def validate(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_executable("zlayerctl"), "validate", str(path), *args],
        capture_output=True, text=True, timeout=60,
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
        "warning: service web: pid_mode 'container:db' is not supported; use private "
        "(the default) or host" + refused,
        "warning: service web: ipc_mode 'container:db' is not supported; use private "
        "(the default), shareable, none or host" + refused,
        "warning: service web: userns_mode 'keep-id' is not supported; replicas run in the "
        "host's user namespace (leave it out, or host)" + refused,
        "warning: service web: security_opt 'apparmor=docker-default' would not be applied on "
        "this node (no seccomp, AppArmor or SELinux profiles are loaded); remove it, or use "
        "no-new-privileges" + refused,
        "warning: service web: init step seed uses init.s3_pull, which this node does not run "
        "yet; fetch the files with an init.run step instead" + refused,
        "warning: service web: s3 storage (data at /data) is not supported on this node yet; "
        "use a named volume" + refused,
        "warning: service web: resources.gpu asks for GPUs, which this node does not hand out "
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
        "warning: service web: tty and stdin_open are not supported; the replica runs with no "
        "terminal and stdin closed (`zlayerctl exec -t` gives a command one)",
        "warning: service web: port_mappings are not applied; publish a port with an endpoint "
        "(expose: public)",
        "warning: service web: node_mode places replicas across a cluster; on one node it has "
        "no effect",
        "warning: service web: node_selector places replicas across a cluster; on one node it "
        "has no effect",
        "warning: service web: logs is accepted but not applied by this version of ZLayer",
    ]
    as_json = json.loads(validate(path, "--format", "json").stdout)
    assert as_json["valid"] is True and len(as_json["warnings"]) == 5
