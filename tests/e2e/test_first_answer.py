"""A new replica answers through proxyd soon after ``zlayerctl up -b`` returns.

The health check's interval is 10 s: the replica's first probe runs as soon
as it starts, a failed one is retried within milliseconds, and schedd pushes
the traffic view the moment the replica turns healthy, so the first 200 comes
long before one interval has passed. Only a healthy replica is routed: until
its server answers, proxyd has no backend for it.
"""

from __future__ import annotations

import http.client
import os
import time

import pytest

from tests.e2e.node import Node


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.usefixtures("down_everything"),
]

INTERVAL = 10.0

# The server opens its port a moment after the container starts, so the first
# probe usually finds it closed.
SPEC = """
version: v1
deployment: first
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args:
        - "sleep 0.2 && mkdir -p /www && echo first > /www/index.html &&
          exec httpd -f -p 8080 -h /www"
    endpoints:
      - {{name: http, protocol: http, port: {port}, target_port: 8080, expose: public}}
    stop_signal: SIGKILL
    health:
      interval: 10s
      check: {{type: tcp}}
"""


def status(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/index.html")
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


def test_the_first_200_through_proxyd_comes_before_one_health_interval(node: Node) -> None:
    spec = node.spec("first", SPEC.format(port=node.http_port))
    up = node.ctl("up", "-b", str(spec))
    assert up.returncode == 0, up.stderr
    returned = time.monotonic()
    answers = []
    while time.monotonic() - returned < INTERVAL:
        answers.append(status(node.http_port))
        if answers[-1] == 200:
            break
        time.sleep(0.01)
    took = time.monotonic() - returned
    assert answers[-1] == 200, f"no 200 through proxyd within {INTERVAL:.0f}s: {answers[-5:]}"
    # Before it was healthy proxyd had no backend for it: never a 200 from elsewhere.
    assert set(answers[:-1]) <= {0, 503}, answers
    (replica,) = node.replicas("first")
    assert replica["health"] == "healthy"
    assert took < INTERVAL
