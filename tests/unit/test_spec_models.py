"""Shorthands, aliases and defaults of the spec models."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.spec import (
    AdaptiveScale,
    DeploymentSpec,
    FixedScale,
    SpecError,
    parse_spec,
    spec_to_data,
)

HEAD = "version: v1\ndeployment: app\nservices:\n  web:\n"


def service(body: str) -> DeploymentSpec:
    return parse_spec(HEAD + body, "t.zlayer.yml")


def test_defaults_are_filled_in() -> None:
    web = service("    image: nginx:1\n").services["web"]
    assert web.rtype == "service"
    assert web.image.name == "nginx:1"
    assert web.image.pull_policy == "if_not_present"
    assert isinstance(web.scale, AdaptiveScale)
    assert (web.scale.min, web.scale.max, web.scale.cooldown) == (1, 10, timedelta(seconds=30))
    assert web.health.retries == 3
    assert web.health.check.type == "tcp"
    assert web.node_mode == "shared"
    assert web.network.join.mode == "token"


def test_env_list_form_becomes_a_map() -> None:
    body = "    image: x\n    env:\n      - {name: A, value: one}\n      - {name: B, value: 2}\n"
    assert service(body).services["web"].env == {"A": "one", "B": "2"}


def test_env_scalars_read_as_written() -> None:
    body = "    image: x\n    env:\n      PORT: 8080\n      ON: true\n      RATIO: 0.7\n"
    assert service(body).services["web"].env == {"PORT": "8080", "ON": "true", "RATIO": "0.7"}


@pytest.mark.parametrize(
    "value",
    ["$E:HOME", "$S:db-password", "$S:@api/token", "pg://u:$E:PW@db:5432/x", "plain $ sign"],
)
def test_well_formed_references(value: str) -> None:
    body = f"    image: x\n    env:\n      V: {value!r}\n"
    assert service(body).services["web"].env["V"] == value


def test_expose_true_is_public() -> None:
    body = (
        "    image: x\n    endpoints:\n      - {name: a, protocol: http, port: 80, expose: true}\n"
    )
    assert service(body).services["web"].endpoints[0].expose == "public"


def test_command_list_is_args() -> None:
    web = service("    image: x\n    command: [sh, -c, sleep 1]\n").services["web"]
    assert web.command.args == ["sh", "-c", "sleep 1"]
    assert web.command.entrypoint is None


def test_aliases_fold_into_their_fields() -> None:
    body = (
        "    image: x\n    cap_add: [NET_ADMIN]\n    wasm_http: {max_instances: 4}\n"
        "    host_network: true\n"
    )
    web = service(body).services["web"]
    assert web.capabilities == ["NET_ADMIN"]
    assert web.wasm is not None and web.wasm.max_instances == 4
    assert web.network_mode == "host"


def test_scale_is_tagged_by_mode() -> None:
    web = service("    image: x\n    scale: {mode: fixed, replicas: 3}\n").services["web"]
    assert web.scale == FixedScale(mode="fixed", replicas=3)
    assert service("    image: x\n    scale: {mode: manual}\n").services["web"].scale.mode == (
        "manual"
    )


def test_storage_is_tagged_by_type() -> None:
    body = (
        "    image: x\n    storage:\n"
        "      - {type: bind, source: /srv, target: /srv, readonly: true}\n"
        "      - {type: named, name: d, target: /d, size: 5Gi}\n"
        "      - {type: anonymous, target: /a}\n"
        "      - {type: tmpfs, target: /t, size: 64Mi, mode: 01777}\n"
        "      - {type: s3, bucket: b, target: /s}\n"
    )
    storage = service(body).services["web"].storage
    assert [s.type for s in storage] == ["bind", "named", "anonymous", "tmpfs", "s3"]
    assert storage[1].size == 5 * 1024**3  # type: ignore[union-attr]


def test_restart_kind_no_survives_yaml_1_1() -> None:
    web = service("    image: x\n    restart_policy: {kind: no}\n").services["web"]
    assert web.restart_policy is not None and web.restart_policy.kind == "no"


@pytest.mark.parametrize(
    "schedule", ["0 3 * * *", "*/5 * * * *", "0 0 3 * * *", "0 0 3 * * * *", "0 0 12 * * MON-FRI *"]
)
def test_cron_forms(schedule: str) -> None:
    body = f"    rtype: cron\n    schedule: {schedule!r}\n    image: x\n"
    assert service(body).services["web"].schedule == schedule


def test_cron_that_never_fires_is_refused() -> None:
    with pytest.raises(SpecError, match="never fires"):
        service("    rtype: cron\n    schedule: '0 0 0 31 2 * *'\n    image: x\n")


def test_durations_and_sizes_dump_as_spec_strings() -> None:
    body = "    image: x\n    resources: {memory: 512Mi}\n    stop_grace_period: 90s\n"
    data = spec_to_data(service(body))["services"]["web"]
    assert data["resources"]["memory"] == "512Mi"
    assert data["stop_grace_period"] == "1m30s"
    assert data["scale"]["cooldown"] == "30s"


def test_python_construction_runs_the_cross_service_checks() -> None:
    with pytest.raises(ValueError, match="no service `db`"):
        DeploymentSpec.model_validate(
            {
                "version": "v1",
                "deployment": "app",
                "services": {"web": {"image": "x", "depends": [{"service": "db"}]}},
            }
        )


def test_top_level_extras() -> None:
    text = (
        "version: v1\ndeployment: app\n"
        "api: {bind: '127.0.0.1:3669', swagger: false}\n"
        "tunnels:\n  db:\n    from: a\n    to: b\n    local_port: 5432\n    remote_port: 5432\n"
    )
    spec = parse_spec(text, "t")
    assert spec.api.swagger is False
    assert spec.tunnels["db"].from_ == "a"
    assert spec_to_data(spec)["tunnels"]["db"]["from"] == "a"
