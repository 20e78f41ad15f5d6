"""What an operator alerts on, read by a real Prometheus from the daemons' metrics ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.node import Node, free_port, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="needs Debian's prometheus package (scripts/apt-deps.sh test installs it)",
    ),
    pytest.mark.usefixtures("down_everything"),
]

SPEC = """
version: v1
deployment: metrics
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www"]
    scale: {mode: fixed, replicas: 2}
    stop_grace_period: 1s
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {type: tcp, port: 8080}
"""


def metrics_urls(node: Node) -> dict[str, str]:
    rows = json.loads(node.ctl("status", "--format", "json", check=True).stdout)
    return {row["name"]: row["metrics_url"] for row in rows}


@pytest.fixture
def prometheus(node: Node, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping every daemon once a second; its HTTP API's URL."""
    targets = [urllib.parse.urlsplit(url).netloc for url in metrics_urls(node).values() if url]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: zlayer\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(api: str, expression: str) -> list[dict[str, Any]]:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
    except OSError:
        return []  # not up yet
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def value(api: str, expression: str) -> float | None:
    found = query(api, expression)
    return float(found[0]["value"][1]) if found else None


def test_every_daemon_passes_promtool(node: Node) -> None:
    for name, url in metrics_urls(node).items():
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read()
        lint = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, check=False
        )
        assert lint.returncode == 0, f"{name}: {lint.stdout.decode()}{lint.stderr.decode()}"


def test_replica_counts_restarts_and_passes_reach_prometheus(node: Node, prometheus: str) -> None:
    spec = node.spec("metrics", SPEC)
    node.ctl("up", "-d", str(spec), "--timeout", "90", check=True)

    healthy = 'zlayer_scheduler_replicas{deployment="metrics",service="web",kind="healthy"}'
    wait_until(lambda: value(prometheus, healthy) == 2, 60, "schedd's healthy count in Prometheus")
    desired = 'zlayer_scheduler_replicas{deployment="metrics",service="web",kind="desired"}'
    assert value(prometheus, desired) == 2
    running = 'sum(zlayer_agent_replicas{deployment="metrics",state="running"})'
    wait_until(lambda: value(prometheus, running) == 2, 30, "agentd's running count")
    assert (value(prometheus, "sum(zlayer_scheduler_reconcile_seconds_count)") or 0) > 0
    accepted = 'sum(zlayer_scheduler_views_sent_total{result="accepted"})'
    assert (value(prometheus, accepted) or 0) >= 3  # agentd, overlayd and proxyd took a view

    victim = node.replicas("metrics")[0]
    os.kill(victim["pid"], signal.SIGKILL)
    restarts = 'sum(zlayer_agent_replica_restarts_total{deployment="metrics"})'
    wait_until(lambda: (value(prometheus, restarts) or 0) >= 1, 60, "the restart counted")

    node.ctl("scale", "web", "1", "-d", "metrics", check=True)
    wait_until(lambda: value(prometheus, desired) == 1, 30, "the scale-down in Prometheus")
    node.ctl("down", "metrics", check=True)
    # A removed deployment's series go, so no alert fires for what is gone.
    wait_until(lambda: value(prometheus, desired) is None, 30, "the removed series to go")
