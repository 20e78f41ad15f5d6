"""overlayd's pure traffic parts: the DNS zone and answers, published ports, their nft rules."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from daemons.overlayd import nft
from daemons.overlayd.dns import DnsServer, Upstream, Zone, parse_upstream
from daemons.overlayd.publish import (
    PortConflictError,
    TrafficError,
    check_conflicts,
    parse_traffic,
    probe_key,
    published_ports,
)
from shared.wire import encode
from shared.wire.traffic import Backend, DeploymentTraffic, ServiceTraffic


def traffic(deployment: str, services: dict[str, tuple[list[dict[str, Any]], int]]) -> Any:
    """services: name -> (endpoints, backend count); backends at 10.9.<n>.<i>."""
    return DeploymentTraffic(
        deployment=deployment,
        services=[
            ServiceTraffic(
                deployment=deployment,
                service=name,
                endpoints=endpoints,
                backends=[
                    Backend(
                        replica=f"{deployment}-{name}-{i}-r1",
                        instance=i,
                        revision=1,
                        address=f"10.9.{n}.{i}",
                    )
                    for i in range(1, count + 1)
                ],
            )
            for n, (name, (endpoints, count)) in enumerate(services.items())
        ],
    )


def test_zone_names_and_sorted_records() -> None:
    zone = Zone()
    zone.set(traffic("shop", {"web": ([], 2)}))
    zone.set(traffic("blog", {"web": ([], 1)}))
    assert zone.lookup("web.service.local") == ["10.9.0.1", "10.9.0.2"]
    assert zone.lookup("web.blog.service.local") == ["10.9.0.1"]
    assert zone.lookup("web-2.web.service.local") == ["10.9.0.2"]
    assert zone.lookup("2.web.shop.service.local") == ["10.9.0.2"]
    assert zone.lookup("web-3.web.service.local") is None
    names = [(r.name, r.deployment) for r in zone.records()]
    assert names == sorted(names)
    zone.set(DeploymentTraffic(deployment="blog"))
    assert {r.deployment for r in zone.records()} == {"shop"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9.9.9.9", Upstream("9.9.9.9", 53)),
        ("127.0.0.1:5353", Upstream("127.0.0.1", 5353)),
        ("::1", Upstream("::1", 53)),
        ("[::1]:5353", Upstream("::1", 5353)),
    ],
)
def test_upstreams(text: str, expected: Upstream) -> None:
    assert parse_upstream(text) == expected
    assert parse_upstream(str(expected)) == expected


@pytest.mark.parametrize("text", ["dns.example", "1.2.3.4:0", "[::1]x"])
def test_bad_upstreams(text: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream(text)


def resolve(server: DnsServer, query: DNSRecord, tcp: bool = False) -> DNSRecord:
    packed = asyncio.run(server.resolve(query.pack(), tcp=tcp))
    assert packed is not None
    return DNSRecord.parse(packed)


def test_answers_nxdomain_nodata_and_truncation() -> None:
    zone = Zone()
    zone.set(traffic("big", {"many": ([], 60)}))
    server = DnsServer(zone, [])
    many = resolve(server, DNSRecord.question("many.service.local"))
    # 60 A records do not fit 512 bytes: as many as fit, and TC so the client retries on TCP.
    assert many.header.tc == 1 and 0 < len(many.rr) < 60
    assert len(resolve(server, DNSRecord.question("many.service.local"), tcp=True).rr) == 60
    edns = DNSRecord.question("many.service.local")
    edns.add_ar(EDNS0(udp_len=4096))
    assert len(resolve(server, edns).rr) == 60

    missing = resolve(server, DNSRecord.question("few.service.local"))
    assert missing.header.rcode == RCODE.NXDOMAIN and missing.auth[0].rtype == QTYPE.SOA
    aaaa = resolve(server, DNSRecord.question("many.service.local", "AAAA"))
    assert aaaa.header.rcode == RCODE.NOERROR and not aaaa.rr
    # No upstream for outside names: SERVFAIL, not silence.
    outside = resolve(server, DNSRecord.question("example.org"))
    assert outside.header.rcode == RCODE.SERVFAIL
    # Garbage with a header gets FORMERR; less than a header gets nothing.
    assert asyncio.run(server.resolve(b"\x12\x34" + b"\xff" * 14, tcp=False)) is not None
    assert asyncio.run(server.resolve(b"\x00", tcp=False)) is None


def endpoint(protocol: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": f"{protocol}{port}", "protocol": protocol, "port": port, **extra}


def test_only_public_plain_tcp_and_udp_take_the_kernel_path() -> None:
    endpoints = [
        endpoint("tcp", 5432, expose="public", target_port=5433),
        endpoint("udp", 53, expose="public", stream={"session_timeout": "1m"}),
        endpoint("tcp", 6000),  # internal
        endpoint("http", 80, expose="public"),  # proxyd
        endpoint("tcp", 7000, expose="public", stream={"tls": True}),  # proxyd
    ]
    ports = published_ports(traffic("app", {"db": (endpoints, 2)}))
    assert [(p.protocol, p.port) for p in ports] == [("tcp", 5432), ("udp", 53)]
    assert {t.port for t in ports[0].targets} == {5433}
    assert ports[1].session_timeout == 60 and ports[0].session_timeout is None


def test_conflicts_and_bad_pushes() -> None:
    a = published_ports(traffic("a", {"s": ([endpoint("tcp", 80, expose="public")], 1)}))
    b = published_ports(traffic("b", {"s": ([endpoint("tcp", 80, expose="public")], 1)}))
    with pytest.raises(PortConflictError, match="already published by the deployment 'a'"):
        check_conflicts("b", b, {"a": a})
    check_conflicts("a", a, {"a": a})  # a push replaces its own ports
    twice = [endpoint("tcp", 80, expose="public"), dict(endpoint("tcp", 80, expose="public"))]
    twice[1]["name"] = "other"
    with pytest.raises(TrafficError, match="both publish tcp port 80"):
        published_ports(traffic("a", {"s": (twice, 1)}))
    with pytest.raises(TrafficError, match="not a DNS-safe"):
        parse_traffic("Bad_Name", encode(DeploymentTraffic(deployment="Bad_Name")))


def test_rules_round_robin_reject_and_health() -> None:
    udp = endpoint("udp", 5353, expose="public", stream={"session_timeout": "20s"})
    ports = published_ports(
        traffic(
            "app",
            {
                "web": ([endpoint("tcp", 8080, expose="public")], 3),
                "dns": ([udp], 1),
                "idle": ([endpoint("tcp", 9000, expose="public")], 0),
            },
        )
    )
    text = nft.ruleset(
        "zl",
        "zlbr",
        IPv4Network("10.9.0.0/16"),
        gateway=IPv4Address("10.9.0.1"),
        published={"app": ports},
    )
    assert "tcp dport 8080 dnat to numgen inc mod 3 map { 0 : 10.9.0.1 . 8080," in text
    # One lookup dispatches a new connection, however many deployments there are.
    dispatch = (
        "meta l4proto . th dport vmap { tcp . 8080 : jump pub_app, "
        "tcp . 9000 : jump pub_app, udp . 5353 : jump pub_app }"
    )
    assert dispatch in text
    assert "\n        jump pub_app" not in text
    assert 'udp dport 5353 ct timeout set "udp_20s"' in text
    assert "ct timeout udp_20s { protocol udp;" in text
    assert "tcp dport 9000 reject with tcp reset" in text
    assert "ip daddr 10.9.0.1 udp dport 53 return" in text

    web = ports[0]
    down = frozenset({probe_key(web, web.targets[0])})
    update = nft.deployment_update(
        "zl",
        "app",
        gateway=IPv4Address("10.9.0.1"),
        dns_port=53,
        published={"app": ports},
        down={"app": down},
    )
    assert "numgen inc mod 2 map { 0 : 10.9.0.2 . 8080, 1 : 10.9.0.3 . 8080 }" in update
    assert f"add rule ip zl published {dispatch}" in update
    assert "delete chain" not in update
    removal = nft.deployment_update(
        "zl", "app", gateway=IPv4Address("10.9.0.1"), dns_port=53, published={}, down={}
    )
    assert removal.splitlines()[-1] == "delete chain ip zl pub_app"
    assert "vmap" not in removal  # nothing left to dispatch: no empty map
