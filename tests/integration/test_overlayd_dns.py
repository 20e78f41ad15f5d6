"""zlayer-overlayd's service DNS, asked the way replicas ask it.

A real overlayd on a private bus serves DNS on its bridge's gateway
address, port 53 (the gateway is the test's own, so nothing else listens
there). Records come from SetTraffic pushes; names outside service.local go
to a tiny upstream DNS server the test runs on 127.0.0.1 (no internet
needed). Queries are made with dnslib over UDP and TCP, and with glibc
(``getent``) from inside a replica's namespace through the resolv.conf
agentd would write for it.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from shared.bus import InvalidArgumentError
from shared.netfiles import resolv_conf
from shared.wire.overlay import Attachment
from shared.wire.traffic import Backend, DeploymentTraffic, DnsRecord, ServiceTraffic
from tests.integration import test_overlayd as base
from tests.integration.test_overlayd import Overlayd, in_netns

pytestmark = base.pytestmark
make_overlayd = base.make_overlayd
_netns_dir = base._netns_dir

UPSTREAM_ADDRESS = "192.0.2.7"


class Upstream(BaseResolver):  # type: ignore[misc]
    """Answers example.test; big.test is truncated over UDP and whole over TCP."""

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        if name == "example.test":
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(UPSTREAM_ADDRESS), ttl=60))
        elif name == "big.test":
            if handler.protocol == "udp":
                reply.header.tc = 1
            else:
                for i in range(1, 61):
                    reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(f"192.0.2.{i}")))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@pytest.fixture
def upstream() -> Iterator[list[DNSServer]]:
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", logf=lambda _: 0)
    udp = DNSServer(Upstream(), address="127.0.0.1", port=0, logger=quiet)
    port = udp.server.server_address[1]
    tcp = DNSServer(Upstream(), address="127.0.0.1", port=port, tcp=True, logger=quiet)
    servers = [udp, tcp]
    for server in servers:
        server.start_thread()
    try:
        yield servers
    finally:
        for server in servers:
            if server.isAlive():
                server.stop()
            server.server.server_close()


def start_overlayd(make_overlayd: Any, upstream: list[DNSServer] | None) -> Overlayd:
    daemon: Overlayd = make_overlayd()
    config = daemon.paths.daemon_config("overlayd")
    extra = "dns_port = 53\n"
    if upstream is not None:
        port = upstream[0].server.server_address[1]
        # A dead resolver first: overlayd moves on to the next.
        extra += f'nameservers = ["127.0.0.1:9", "127.0.0.1:{port}"]\n'
    config.write_text(config.read_text() + extra)
    daemon.start()
    return daemon


def gateway(overlayd: Overlayd) -> str:
    return str(overlayd.subnet.network_address + 1)


def ask(overlayd: Overlayd, name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    return DNSRecord.parse(query.send(gateway(overlayd), 53, tcp=tcp, timeout=8))


def addresses(reply: DNSRecord) -> set[str]:
    return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}


def backend(replica: str, instance: int, address: str, revision: int = 1) -> Backend:
    return Backend(replica=replica, instance=instance, revision=revision, address=address)


def push(overlayd: Overlayd, deployment: str, services: dict[str, list[Backend]]) -> None:
    traffic = DeploymentTraffic(
        deployment=deployment,
        services=[
            ServiceTraffic(deployment=deployment, service=name, backends=backends)
            for name, backends in services.items()
        ],
    )
    overlayd.ask(lambda client: client.set_traffic(deployment, traffic))


def records(overlayd: Overlayd) -> list[DnsRecord]:
    return overlayd.ask(lambda client: client.list_records())


def test_service_and_replica_names_follow_the_pushes(make_overlayd: Any) -> None:
    overlayd = start_overlayd(make_overlayd, None)
    net = str(overlayd.subnet.network_address)[:-1]  # "10.231.x."
    # shop/web mid-rollout: revision 2 of instance 1 runs beside revision 1.
    shop_web = [
        backend("shop-web-1-r1", 1, net + "11"),
        backend("shop-web-2-r1", 2, net + "12"),
        backend("shop-web-1-r2", 1, net + "13", revision=2),
    ]
    push(overlayd, "shop", {"web": shop_web, "db": [backend("shop-db-1-r1", 1, net + "21")]})
    push(overlayd, "blog", {"web": [backend("blog-web-1-r1", 1, net + "31")]})

    shop_all = {net + "11", net + "12", net + "13"}
    everyone = shop_all | {net + "31"}
    assert addresses(ask(overlayd, "web.service.local")) == everyone
    assert addresses(ask(overlayd, "WEB.Service.Local", tcp=True)) == everyone
    assert addresses(ask(overlayd, "web.shop.service.local")) == {
        net + "11",
        net + "12",
        net + "13",
    }
    assert addresses(ask(overlayd, "web.blog.service.local")) == {net + "31"}
    assert addresses(ask(overlayd, "web-2.web.service.local")) == {net + "12"}
    assert addresses(ask(overlayd, "2.web.service.local")) == {net + "12"}
    assert addresses(ask(overlayd, "1.web.shop.service.local")) == {net + "11", net + "13"}
    assert addresses(ask(overlayd, "web-1.web.service.local")) == {
        net + "11",
        net + "13",
        net + "31",
    }
    reply = ask(overlayd, "db.service.local")
    assert addresses(reply) == {net + "21"} and reply.header.aa == 1
    assert all(rr.ttl <= 5 for rr in reply.rr)

    # Unknown names under service.local do not exist; known ones have no AAAA.
    for name in ("nope.service.local", "web-9.web.service.local", "web.nope.service.local"):
        assert ask(overlayd, name).header.rcode == RCODE.NXDOMAIN, name
    aaaa = ask(overlayd, "web.service.local", "AAAA")
    assert aaaa.header.rcode == RCODE.NOERROR and not aaaa.rr

    # ListRecords: every name, sorted.
    listed = records(overlayd)
    assert [r.name for r in listed] == sorted(r.name for r in listed)
    shop = {r.name: set(r.addresses) for r in listed if r.deployment == "shop"}
    assert shop["web.service.local"] == {net + "11", net + "12", net + "13"}
    assert shop["web-1.web.shop.service.local"] == {net + "11", net + "13"}

    # Revision 1 of instance 1 leaves rotation; blog goes away.
    push(overlayd, "shop", {"web": shop_web[1:], "db": []})
    push(overlayd, "blog", {})
    assert addresses(ask(overlayd, "web.service.local")) == {net + "12", net + "13"}
    assert addresses(ask(overlayd, "1.web.service.local")) == {net + "13"}
    empty = ask(overlayd, "db.service.local")  # a service with no backend in rotation
    assert empty.header.rcode == RCODE.NOERROR and not empty.rr
    assert ask(overlayd, "web.blog.service.local").header.rcode == RCODE.NXDOMAIN
    assert not [r for r in records(overlayd) if r.deployment == "blog"]

    metrics = overlayd.metrics()
    assert re.search(r'zlayer_overlay_dns_queries_total\{result="answer"\} [1-9]', metrics)
    assert re.search(r'zlayer_overlay_dns_queries_total\{result="nxdomain"\} [1-9]', metrics)


def test_a_replica_resolves_through_its_resolv_conf_and_outside_names_are_forwarded(
    make_overlayd: Any, upstream: list[DNSServer]
) -> None:
    if shutil.which("getent") is None:
        pytest.skip("getent is missing (apt-get install libc-bin)")
    overlayd = start_overlayd(make_overlayd, upstream)
    attachment: Attachment = overlayd.attach("api-1", "api-1")
    assert attachment.dns == [gateway(overlayd)]
    assert attachment.search[0] == "service.local"
    netns = Path(attachment.netns).name
    # ip netns exec puts /etc/netns/<name>/resolv.conf over /etc/resolv.conf.
    etc = Path("/etc/netns") / netns
    etc.mkdir(parents=True)
    try:
        (etc / "resolv.conf").write_text(resolv_conf(attachment))
        push(overlayd, "shop", {"api": [backend("shop-api-1-r1", 1, attachment.address)]})

        found = in_netns(attachment, "getent", "ahostsv4", "api")
        assert found.returncode == 0, found.stderr
        assert attachment.address in found.stdout
        assert attachment.address in in_netns(attachment, "getent", "hosts", "1.api").stdout
        # A name outside service.local, answered by the upstream server.
        outside = in_netns(attachment, "getent", "ahostsv4", "example.test")
        assert UPSTREAM_ADDRESS in outside.stdout, outside.stderr
        assert in_netns(attachment, "getent", "hosts", "nope.test").returncode == 2
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        overlayd.detach("api-1")

    assert addresses(ask(overlayd, "example.test")) == {UPSTREAM_ADDRESS}
    assert addresses(ask(overlayd, "example.test", tcp=True)) == {UPSTREAM_ADDRESS}
    # Truncated over UDP upstream: overlayd asks again over TCP, and tells a
    # UDP client the answer does not fit (it retries over TCP).
    over_udp = ask(overlayd, "big.test")
    assert over_udp.header.tc == 1
    assert len(addresses(ask(overlayd, "big.test", tcp=True))) == 60

    # The upstream stops answering: SERVFAIL, after the timeouts, not silence.
    for server in upstream:
        server.stop()
    started = time.monotonic()
    assert ask(overlayd, "example.test").header.rcode == RCODE.SERVFAIL
    assert time.monotonic() - started < 7
    assert 'result="servfail"' in overlayd.metrics()


def test_restarted_overlayd_answers_from_what_it_kept(make_overlayd: Any) -> None:
    overlayd = start_overlayd(make_overlayd, None)
    net = str(overlayd.subnet.network_address)[:-1]
    push(overlayd, "shop", {"web": [backend("shop-web-1-r1", 1, net + "11")]})
    overlayd.stop()
    overlayd.start()
    # The first query after READY is answered from the persisted push.
    assert addresses(ask(overlayd, "web.service.local")) == {net + "11"}
    assert records(overlayd)[0].name == "1.web.service.local"

    # A push that is not valid changes nothing and says why in one sentence.
    with pytest.raises(InvalidArgumentError) as caught:
        overlayd.call("set_traffic", "shop", '{"deployment": "shop", "services": 3}')
    assert "not a DeploymentTraffic" in str(caught.value) and "\n" not in str(caught.value)
    assert addresses(ask(overlayd, "web.service.local")) == {net + "11"}

    # Removing the deployment removes what was kept: after a restart it stays gone.
    push(overlayd, "shop", {})
    overlayd.stop()
    overlayd.start()
    assert ask(overlayd, "web.service.local").header.rcode == RCODE.NXDOMAIN
    assert records(overlayd) == []
