"""schedd's deploy-time port check: what public endpoints of two deployments may share."""

from __future__ import annotations

import pytest

from daemons.schedd.scheduler import _port_clash, _public_ports
from shared.spec import parse_spec


def claims(*endpoints: str) -> dict[tuple[str, str], str]:
    listed = "\n".join(f"      - {e}" for e in endpoints)
    spec = f"""
version: v1
deployment: d
services:
  web:
    image: zlayer/busybox
    endpoints:
{listed}
"""
    return _public_ports(parse_spec(spec, "t.yml"))


def clash(mine: str, theirs: str) -> tuple[str, str] | None:
    ((claim, _),) = claims(mine).items()
    return _port_clash(claim, claims(theirs))


HTTP = "{name: e, protocol: http, expose: public, port: 8080"


@pytest.mark.parametrize(
    ("mine", "theirs", "fix"),
    [
        # One listener per port, shared by the routes of one scheme, routed by host and path.
        (HTTP + ", host: a.test}", HTTP + ", host: b.test}", None),
        (HTTP + ", path: /a}", HTTP + ", path: /b}", None),
        (HTTP + "}", "{name: e, protocol: websocket, expose: public, port: 8080, path: /ws}", None),
        (HTTP + ", host: a.test}", HTTP + ", host: a.test}", "give it another host or path"),
        (HTTP + "}", "{name: e, protocol: https, expose: public, port: 8080}", "pick another port"),
        (HTTP + "}", "{name: e, protocol: tcp, expose: public, port: 8080}", "pick another port"),
        # Other ports, a udp port and internal endpoints share nothing.
        (HTTP + "}", "{name: e, protocol: http, expose: public, port: 8081}", None),
        (HTTP + "}", "{name: e, protocol: udp, expose: public, port: 8080}", None),
        (HTTP + "}", "{name: e, protocol: http, port: 8080}", None),
        (
            "{name: e, protocol: tcp, expose: public, port: 5432}",
            "{name: e, protocol: tcp, expose: public, port: 5432}",
            "pick another port",
        ),
    ],
)
def test_what_two_deployments_may_share(mine: str, theirs: str, fix: str | None) -> None:
    found = clash(mine, theirs)
    assert (found[1] if found else None) == fix


def test_the_claim_names_the_port() -> None:
    ((label, _),) = claims(HTTP + ", host: a.test, path: /api}")
    assert label == "route http://a.test:8080/api"
    theirs = clash(HTTP + "}", "{name: raw, protocol: tcp, expose: public, port: 8080}")
    assert theirs == ("service web endpoint raw (port 8080/tcp)", "pick another port")
