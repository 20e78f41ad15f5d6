"""zlayerctl through a node's API over HTTPS: a context naming the CA, a read and a deploy.

The module's node has its zlayer-apid restarted with a self-signed certificate
(tls_cert_file, tls_key_file), as an operator would set it up; zlayerctl runs
in an environment that names neither the node's prefix nor its bus, so it can
only reach the node over HTTPS. Without the CA, one sentence about the
certificate.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from ctl.supervisor import find_executable
from daemons.proxyd.tls import make_self_signed
from tests.e2e.node import IMAGE, Node, wait_until

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root"),
    pytest.mark.usefixtures("down_everything"),
]

HTTPS_API = re.compile(r"REST API on 127\.0\.0\.1:(\d+) \(HTTPS\)")

SPEC = f"""
version: v1
deployment: secure
services:
  idle:
    image: {IMAGE}
    command:
      entrypoint: ["sh", "-c"]
      args: ["exec sleep 1000"]
"""


def _https_port(node: Node) -> int | None:
    rows = json.loads(node.ctl("status", "--format", "json").stdout or "[]")
    for row in rows:
        if row["name"] == "apid" and row["state"] == "running":
            found = HTTPS_API.search(row["detail"])
            return int(found.group(1)) if found else None
    return None


def test_a_context_with_the_ca_reads_and_deploys_over_https(node: Node, tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path / "tls")  # its name is localhost
    config = node.paths.daemon_config("apid")
    config.write_text(config.read_text() + f'\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    os.kill(node.daemon_pid("apid"), signal.SIGTERM)  # the supervisor starts it again
    port = wait_until(lambda: _https_port(node), 60, "zlayer-apid to serve HTTPS")
    url = f"https://localhost:{port}"
    token = node.ctl("token", "create", "tls-admin", "--role", "admin", check=True).stdout

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ZLAYER_PREFIX", "ZLAYER_BUS_ADDRESS", "ZLAYER_HOST", "ZLAYER_TOKEN")
    }

    def ctl(home: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [find_executable("zlayerctl"), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(env, XDG_CONFIG_HOME=str(tmp_path / home)),
            cwd=node.workdir,
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    # without the CA: one sentence about the certificate, naming --ca-file
    untrusted = ctl("stranger", "--host", url, "ps", stdin="")
    assert untrusted.returncode == 1
    assert untrusted.stderr.startswith(f"error: the TLS certificate of {url} is not trusted")
    assert "--ca-file" in untrusted.stderr and untrusted.stderr.count("\n") == 1

    added = ctl(
        "operator", "context", "add", "node", "--host", url, "--ca-file", str(cert), "--use",
        stdin=token,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    empty = ctl("operator", "ps")
    assert (empty.returncode, empty.stdout) == (0, ""), empty.stderr
    assert "no deployments" in empty.stderr

    up = ctl("operator", "up", "-d", str(node.spec("secure", SPEC)), "--timeout", "90")
    assert up.returncode == 0, up.stderr
    assert "secure is running" in up.stderr
    listed = ctl("operator", "ps", "--format", "json")
    assert [d["name"] for d in json.loads(listed.stdout)] == ["secure"], listed.stderr
    # the host given on the command line takes the context's CA and token with it
    again = ctl("operator", "--host", url, "ps", "--containers", "--format", "json")
    assert [r["service"] for r in json.loads(again.stdout)] == ["idle"], again.stderr

    down = ctl("operator", "down", "secure")
    assert down.returncode == 0, down.stderr
    assert node.ctl("ps", "--format", "json", check=True).stdout.strip() == "[]"
