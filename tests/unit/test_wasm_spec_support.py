"""The spec's WebAssembly settings: what a node runs, refuses and warns about, and the
wasmtime options a WASI replica gets from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemons.agentd.wasm import capability_flags, limit_flags
from shared.spec import ServiceSpec, load_spec
from shared.spec.support import WASM_PROXY_TYPES, node_support

BASE = "version: v1\ndeployment: shop\nservices:\n  fn:\n    image: localhost/fn:1\n"


def support_of(tmp_path: Path, extra: str) -> tuple[list[str], list[str]]:
    path = tmp_path / "shop.zlayer.yml"
    path.write_text(BASE + "".join(f"    {line}\n" for line in extra.strip().splitlines()))
    found = node_support(load_spec(path))
    return found.refusals, found.warnings


def test_wasi_command_settings_pass_quietly(tmp_path: Path) -> None:
    refusals, warnings = support_of(
        tmp_path,
        "wasm: {max_memory: 64Mi, max_fuel: 1000000, allow_tcp: true, allow_udp: true,"
        " allow_http_outgoing: true, preopens: [{source: /srv, target: /data}]}",
    )
    assert (refusals, warnings) == ([], [])


@pytest.mark.parametrize("kind", sorted(WASM_PROXY_TYPES))
def test_upstream_proxy_types_are_refused_with_one_sentence_each(tmp_path: Path, kind: str) -> None:
    refusals, _warnings = support_of(tmp_path, f"service_type: {kind}")
    assert refusals == [
        f"service fn: service_type {kind} makes the module {WASM_PROXY_TYPES[kind]} inside "
        "upstream's proxy, which this node's proxy does not load; run it as a WASI command "
        "(service_type: standard) or a container"
    ]


def test_what_cannot_be_enforced_is_refused_and_what_is_not_applied_is_warned(
    tmp_path: Path,
) -> None:
    refusals, warnings = support_of(
        tmp_path,
        "wasm: {kv_namespace: shop, secrets: [db], allowed_hosts: [example.com],"
        " epoch_interval: 10ms, max_instances: 4}",
    )
    assert refusals == [
        "service fn: wasm.kv_namespace asks for upstream's key-value store, which this node "
        "does not have; remove the kv_ settings and keep the data in a volume",
        "service fn: wasm.secrets asks for upstream's secrets interface, which this node does "
        "not offer; remove it and pass each value to the module through env",
        "service fn: wasm.allowed_hosts cannot be enforced here (wasmtime's outgoing HTTP keeps "
        "no list of hosts); remove it, and leave allow_http_outgoing off to keep HTTP out",
    ]
    assert warnings == [
        "service fn: wasm.epoch_interval is not applied (wasmtime run keeps its own epoch "
        "ticks); bound the module's work with max_fuel",
        "service fn: wasm.max_instances shapes the instances of a wasm_http service; it has no "
        "effect on a WASI command",
    ]


def test_network_is_off_unless_granted_and_limits_become_wasmtime_options() -> None:
    plain = ServiceSpec.model_validate({"image": "localhost/fn:1"})
    assert capability_flags(plain) == ["-S", "tcp=n,udp=n"]
    assert limit_flags(plain) == []
    granted = ServiceSpec.model_validate(
        {
            "image": "localhost/fn:1",
            "wasm": {"allow_tcp": True, "allow_http_outgoing": True, "max_fuel": 5,
                     "max_memory": "1Mi"},
        }
    )  # fmt: skip
    assert capability_flags(granted) == [
        "-S", "tcp=y,udp=n,inherit-network=y,allow-ip-name-lookup=y,http=y",
    ]  # fmt: skip
    assert limit_flags(granted) == ["-W", "max-memory-size=1048576", "-W", "fuel=5"]


def test_wasm_http_needs_an_endpoint_and_its_pool_settings_are_warned(tmp_path: Path) -> None:
    refusals, _warnings = support_of(tmp_path, "service_type: wasm_http")
    assert refusals == [
        "service fn: service_type wasm_http serves HTTP on its first endpoint's target port, "
        "and this service has no endpoint; add one (protocol: http)"
    ]
    refusals, warnings = support_of(
        tmp_path,
        "service_type: wasm_http\n"
        "endpoints: [{name: http, protocol: http, port: 8080}]\n"
        "wasm: {min_instances: 1, idle_timeout: 1m, request_timeout: 5s}",
    )
    assert refusals == []
    assert warnings == [
        "service fn: wasm.min_instances, idle_timeout are not applied: each replica is one "
        "wasmtime serve that makes an instance per request; scale replicas with scale"
    ]
