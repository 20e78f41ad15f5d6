"""The spec's WebAssembly settings: what a node runs, refuses and warns about, and the
wasmtime options a WASI replica gets from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemons.agentd.wasm import capability_flags, limit_flags, serve_flags
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
        "wasm: {kv_namespace: shop, secrets: [db], allowed_hosts: [example.com], max_instances: 4}",
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
        "service fn: wasm.max_instances shapes the instances of a wasm_http service; it has no "
        "effect on a WASI command",
    ]


HTTP = "service_type: wasm_http\nendpoints: [{name: http, protocol: http, port: 8080}]\n"


def test_epoch_interval_is_refused_where_wasmtime_cannot_tick_at_it(tmp_path: Path) -> None:
    # A WASI command: wasmtime run has no epoch ticks to set.
    refusals, warnings = support_of(tmp_path, "wasm: {epoch_interval: 100ms}")
    assert refusals == [
        "service fn: wasm.epoch_interval is how often a wasi:http request yields to the "
        "others, and a WASI command runs alone under wasmtime run, which has no epoch ticks "
        "to set; remove it and bound the module's work with max_fuel"
    ]
    assert warnings == []
    # wasm_http: wasmtime serve yields every 50 ms; a shorter interval cannot be had.
    refusals, _warnings = support_of(tmp_path, HTTP + "wasm: {epoch_interval: 10ms}")
    assert refusals == [
        "service fn: wasm.epoch_interval 10ms is shorter than wasmtime serve's epoch tick of "
        "50ms (its command line has no setting for it); remove it or make it 50ms or more"
    ]
    # A request time limit under 50 ms is the tick itself.
    refusals, _warnings = support_of(
        tmp_path, HTTP + "wasm: {epoch_interval: 10ms, request_timeout: 20ms}"
    )
    assert refusals == [
        "service fn: wasm.epoch_interval 10ms is shorter than wasmtime serve's epoch tick of "
        "20ms (its command line has no setting for it); remove it or make it 20ms or more"
    ]
    for met in ("50ms", "1s"):
        assert support_of(tmp_path, HTTP + f"wasm: {{epoch_interval: {met}}}") == ([], [])


def test_a_command_health_check_is_refused_for_a_webassembly_service(tmp_path: Path) -> None:
    check = 'health: {check: {type: command, command: ["true"]}}\n'
    refusals, _warnings = support_of(tmp_path, HTTP + check)
    assert refusals == [
        "service fn: a command health check cannot run in a WebAssembly replica (its root "
        "holds the module and wasmtime, with no commands to run); use an http or tcp check"
    ]
    # With wasm settings but no service type, the image decides: validate warns.
    refusals, warnings = support_of(tmp_path, check + "wasm: {max_fuel: 5}")
    assert refusals == []
    assert warnings == [
        "service fn: if this service's image is a WebAssembly module, its command health "
        "check cannot run and agentd refuses it (the replica's root holds the module and "
        "wasmtime, with no commands to run); use an http or tcp check"
    ]
    # A container's command check says nothing; a job's never runs.
    assert support_of(tmp_path, check) == ([], [])
    assert support_of(tmp_path, "rtype: job\n" + check + "wasm: {max_fuel: 5}") == ([], [])


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


def test_wasm_http_needs_an_endpoint_and_its_pool_settings_are_applied_or_warned(
    tmp_path: Path,
) -> None:
    refusals, _warnings = support_of(tmp_path, "service_type: wasm_http")
    assert refusals == [
        "service fn: service_type wasm_http serves HTTP on its first endpoint's target port, "
        "and this service has no endpoint; add one (protocol: http)"
    ]
    refusals, warnings = support_of(
        tmp_path,
        HTTP + "wasm: {min_instances: 1, max_instances: 4, idle_timeout: 1m, request_timeout: 5s}",
    )
    assert refusals == []
    assert warnings == [
        "service fn: wasm.min_instances is not applied: wasmtime serve keeps no instances "
        "waiting, each replica loads and links the component before it listens and makes an "
        "instance per request; keep replicas running with scale",
        "service fn: wasm.idle_timeout keeps an instance between requests only for a WASIp3 "
        "component; wasmtime serve gives a WASIp2 component a new instance for each request, "
        "so it has none to keep",
    ]
    # max_instances and request_timeout are wasmtime serve's own: nothing to say.
    assert support_of(tmp_path, HTTP + "wasm: {min_instances: 0, max_instances: 2}") == ([], [])


def test_wasm_http_pool_settings_become_wasmtime_serve_options() -> None:
    spec = ServiceSpec.model_validate(
        {
            "image": "localhost/fn:1",
            "service_type": "wasm_http",
            "endpoints": [{"name": "http", "protocol": "http", "port": 80, "target_port": 8080}],
            "wasm": {"max_instances": 3, "idle_timeout": "90s", "request_timeout": "5s"},
        }
    )
    assert serve_flags(spec) == [
        "--addr", "0.0.0.0:8080", "-W", "timeout=5000ms",
        "--max-concurrent-requests", "3", "--idle-instance-timeout", "90000ms",
    ]  # fmt: skip
    # Their defaults (upstream's) apply when the spec has no wasm settings.
    plain = spec.model_copy(update={"wasm": None})
    assert serve_flags(plain)[4:] == [
        "--max-concurrent-requests", "10", "--idle-instance-timeout", "300000ms",
    ]  # fmt: skip
