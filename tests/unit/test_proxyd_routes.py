"""proxyd's pure parts: push validation, route matching, balancing, the PROXY v2 header."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from daemons.proxyd.balancer import pick
from daemons.proxyd.exchange import build_request_head
from daemons.proxyd.routes import RouteError, Routes, normalize_host
from daemons.proxyd.stream import PROXY_V2_SIGNATURE, proxy_v2_header


def push(deployment: str, services: list[dict[str, Any]]) -> str:
    return json.dumps({"deployment": deployment, "services": services})


def web(
    name: str, endpoints: list[dict[str, Any]], addresses: list[str], deployment: str = "d"
) -> dict[str, Any]:
    return {
        "deployment": deployment,
        "service": name,
        "endpoints": endpoints,
        "backends": [
            {"replica": f"{name}-{i}", "instance": i, "revision": 1, "address": a}
            for i, a in enumerate(addresses)
        ],
    }


def http(name: str = "http", **extra: Any) -> dict[str, Any]:
    return {"name": name, "protocol": "http", "port": 8080, "expose": "public", **extra}


def apply(routes: Routes, deployment: str, services: list[dict[str, Any]]) -> None:
    routes.apply(Routes.parse(deployment, push(deployment, services)))


def test_matching_by_host_then_wildcard_then_any_with_longest_prefix(tmp_path: Path) -> None:
    routes = Routes(tmp_path)
    apply(
        routes,
        "d",
        [
            web("api", [http(host="api.example.com", path="/v1")], ["10.0.0.1"]),
            web("deep", [http(host="api.example.com", path="/v1/admin/")], ["10.0.0.2"]),
            web("wild", [http(host="*.example.com")], ["10.0.0.3"]),
            web("any", [http(path="/static")], ["10.0.0.4"]),
            web(
                "tls",
                [http(name="s", protocol="https", port=8443, host="api.example.com")],
                ["10.0.0.5"],
            ),
        ],
    )
    plain = routes.table.ports[8080].public

    def served(host: str, path: str) -> str | None:
        route = plain.match(normalize_host(host), path)
        return route.service if route else None

    assert served("api.example.com", "/v1") == "api"
    assert served("API.Example.com:8080", "/v1/users") == "api"
    assert served("api.example.com", "/v1/admin/x") == "deep"
    assert served("api.example.com", "/v1x") == "wild"
    assert served("a.b.example.com", "/") == "wild"
    assert served("example.com", "/static/app.js") == "any"
    assert served("example.com", "/") is None
    tls = routes.table.ports[8443]
    assert tls.secure and tls.public.match("api.example.com", "/").service == "tls"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("deployment", "payload", "words"),
    [
        ("d", "{", "not a DeploymentTraffic"),
        ("d", push("e", []), "pushed for 'd'"),
        ("d", push("d", [web("w", [http()], ["not-an-ip"])]), "not an IPv4 address"),
        ("d", push("d", [web("w", [http(port=0)], [])]), "endpoint 0 of d/w"),
        ("d", push("d", [web("w", [http(host="a.*.com")], [])]), "wildcard"),
        ("d", push("d", [web("w", [http(path="api")], [])]), "starts with /"),
        ("d", push("d", [web("w", [http("a"), http("b")], [])]), "already routes"),
        (
            "d",
            push(
                "d",
                [
                    web(
                        "u",
                        [
                            {
                                "name": "u",
                                "protocol": "udp",
                                "port": 53,
                                "expose": "public",
                                "stream": {"tls": True},
                            }
                        ],
                        [],
                    )
                ],
            ),
            "no DTLS",
        ),
    ],
)
def test_bad_pushes_are_one_sentence(
    tmp_path: Path, deployment: str, payload: str, words: str
) -> None:
    routes = Routes(tmp_path)
    with pytest.raises(RouteError) as caught:
        routes.apply(Routes.parse(deployment, payload))
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert routes.table.l7 == []


def test_a_clash_with_another_deployment_is_a_conflict_and_changes_nothing(
    tmp_path: Path,
) -> None:
    routes = Routes(tmp_path)
    apply(routes, "one", [web("w", [http()], ["10.0.0.1"], "one")])
    with pytest.raises(RouteError) as caught:
        apply(routes, "two", [web("w", [http()], ["10.0.0.2"], "two")])
    assert caught.value.conflict and "one/w" in str(caught.value)
    assert [r.deployment for r in routes.table.l7] == ["one"]
    apply(routes, "one", [])
    assert routes.table.l7 == [] and routes.deployments == {}


def test_ports_are_plain_or_tls_and_tcp_ports_are_not_shared(tmp_path: Path) -> None:
    routes = Routes(tmp_path)
    apply(routes, "one", [web("w", [http(host="a.test")], ["10.0.0.1"], "one")])
    # Another deployment on the same port, another host: one listener, routed by host.
    apply(routes, "two", [web("w", [http(host="b.test")], ["10.0.0.2"], "two")])
    ports = routes.table.ports[8080]
    served = [ports.public.match(host, "/") for host in ("a.test", "b.test")]
    assert [r.deployment if r else None for r in served] == ["one", "two"]
    https = http(name="s", protocol="https", host="c.test")
    with pytest.raises(RouteError) as caught:
        apply(routes, "three", [web("w", [https], [], "three")])
    assert caught.value.conflict
    assert "a port is plain or TLS" in str(caught.value) and "port 8080" in str(caught.value)
    tcp = {"name": "raw", "protocol": "tcp", "port": 8080, "expose": "public"}
    with pytest.raises(RouteError) as caught:
        apply(routes, "three", [web("w", [tcp], [], "three")])
    assert "three/w endpoint raw is a tcp endpoint" in str(caught.value)
    assert [r.deployment for r in routes.table.l7] == ["one", "two"]


def test_internal_routes_are_served_on_the_node_address_and_only_shadowed(
    tmp_path: Path,
) -> None:
    routes = Routes(tmp_path)
    internal = http(expose="internal")
    apply(
        routes,
        "one",
        [
            web("pub", [http(host="a.test")], ["10.0.0.1"], "one"),
            web("api", [internal], ["10.0.0.2"], "one"),
            web("also", [internal], ["10.0.0.3"], "one"),  # the same spot: shadowed
        ],
    )
    ports = routes.table.ports[8080]
    assert ports.has_public and ports.has_internal
    assert ports.match(False, "x.test", "/") is None  # internal routes: not off the node address
    assert ports.match(True, "x.test", "/").service == "api"  # type: ignore[union-attr]
    assert ports.match(True, "a.test", "/").service == "pub"  # type: ignore[union-attr]
    ((shadowed, why),) = routes.table.shadowed
    assert shadowed.service == "also" and "one/api endpoint http already routes" in why


def test_saved_pushes_load_back_and_a_broken_file_is_moved_aside(tmp_path: Path) -> None:
    routes = Routes(tmp_path)
    traffic = Routes.parse("d", push("d", [web("w", [http()], ["10.0.0.1"])]))
    routes.apply(traffic)
    routes.save(traffic)
    (tmp_path / "traffic" / "broken.json").write_text("{nope")
    (tmp_path / "traffic" / "wrong.json").write_text('{"deployment": "x", "services": 3}')
    again = Routes(tmp_path)
    assert again.load() == []  # each move is logged where it happens
    assert [r.service for r in again.table.l7] == ["w"]
    left = sorted(p.name.split(".corrupt-")[0] for p in (tmp_path / "traffic").iterdir())
    assert left == ["broken.json", "d.json", "wrong.json"]
    assert not (tmp_path / "traffic" / "broken.json").exists()


def test_balancing_round_robin_least_connections_and_exclusion(tmp_path: Path) -> None:
    routes = Routes(tmp_path)
    apply(routes, "d", [web("w", [http()], ["10.0.0.1", "10.0.0.2", "10.0.0.3"])])
    (route,) = routes.table.l7
    first, second, third = route.backends
    assert [pick(route, "round_robin") for _ in range(4)] == [first, second, third, first]
    first.active, second.active, third.active = 3, 1, 1
    assert pick(route, "least_connections") in (second, third)
    assert pick(route, "least_connections", exclude=second) is third
    third.healthy = False
    assert pick(route, "round_robin", exclude=second) is first
    # The in-flight count outlives a push that keeps the backend.
    apply(routes, "d", [web("w", [http()], ["10.0.0.2"])])
    assert routes.table.l7[0].backends[0] is second and second.active == 1


def test_proxy_v2_header_for_ipv4_and_ipv6() -> None:
    header = proxy_v2_header(("192.0.2.1", 40000), ("198.51.100.2", 443))
    assert header[:12] == PROXY_V2_SIGNATURE and header[12] == 0x21 and header[13] == 0x11
    assert int.from_bytes(header[14:16], "big") == 12
    assert header[16:20] == socket.inet_aton("192.0.2.1")
    assert header[24:26] == (40000).to_bytes(2, "big")
    six = proxy_v2_header(("2001:db8::1", 1), ("192.0.2.9", 2), datagram=True)
    assert six[13] == 0x22 and int.from_bytes(six[14:16], "big") == 36


def test_request_head_drops_hop_headers_and_adds_forwarded_ones() -> None:
    head = build_request_head(
        b"POST",
        b"/p?q=1",
        [
            (b"Host", b"app.test"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"X-Secret", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Forwarded-For", b"203.0.113.7"),
            (b"X-Forwarded-Proto", b"gopher"),
        ],
        client_address="127.0.0.1",
        scheme=b"https",
        host=b"app.test",
        body="chunked",
        upgrade=None,
    )
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /p?q=1 HTTP/1.1"
    assert "X-Forwarded-For: 203.0.113.7, 127.0.0.1" in lines
    assert "X-Forwarded-Proto: https" in lines and "X-Forwarded-Host: app.test" in lines
    assert "Transfer-Encoding: chunked" in lines
    assert not any(line.startswith(("Connection", "X-Secret")) for line in lines)
    assert head.endswith(b"\r\n\r\n")
