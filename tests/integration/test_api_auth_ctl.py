"""``zlayerctl token`` against a real zlayer-apid: the token it prints opens the API, ls
shows it without its text, revoke shuts it at once; mistakes are one sentence."""

from __future__ import annotations

import json
import os
import subprocess

from ctl.supervisor import find_executable
from shared.busdaemon import PrivateBus
from shared.paths import Paths
from tests.api_client import running_apid


def zlayerctl(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_executable("zlayerctl"), "token", *args],
        env={**os.environ, "ZLAYER_BUS_ADDRESS": bus.address},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_create_ls_revoke(private_bus: PrivateBus, zlayer_prefix: Paths) -> None:
    with running_apid(private_bus, zlayer_prefix) as apid:
        made = zlayerctl(
            private_bus, "create", "ci", "--role", "operator", "--deployment", "web", "--ttl", "24h"
        )
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert token.count(".") == 2 and "\n" not in token
        assert made.stderr.startswith("token ci: operator of web, expires ")
        status, body, _ = apid.call("GET", "/api/v1/deployments/db", token)
        assert status == 404 and body["detail"] == "there is no deployment named db"

        as_json = zlayerctl(private_bus, "create", "admin", "--role", "admin", "--format", "json")
        assert as_json.returncode == 0, as_json.stderr
        issued = json.loads(as_json.stdout)
        assert issued["info"]["role"] == "admin" and issued["info"]["expires_at"] is None
        assert apid.call("GET", "/api/v1/tokens", issued["token"])[0] == 200

        listed = zlayerctl(private_bus, "ls", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        assert [(t["name"], t["deployments"], t["revoked"]) for t in json.loads(listed.stdout)] == [
            ("admin", [], False),
            ("ci", ["web"], False),
        ]
        table = zlayerctl(private_bus, "ls")
        assert token not in table.stdout and issued["token"] not in table.stdout
        assert "ci" in table.stdout and "active" in table.stdout

        revoked = zlayerctl(private_bus, "revoke", "ci")
        assert (revoked.returncode, revoked.stdout) == (0, "revoked token ci\n")
        assert apid.call("GET", "/api/v1/deployments", token)[0] == 401
        assert "revoked" in zlayerctl(private_bus, "ls").stdout

        again = zlayerctl(private_bus, "create", "admin", "--role", "viewer")
        assert again.returncode == 1
        assert "there is already a token named admin; revoke it first" in again.stderr
        assert "Traceback" not in again.stderr
        bad_ttl = zlayerctl(private_bus, "create", "x", "--role", "viewer", "--ttl", "soon")
        assert bad_ttl.returncode != 0 and "--ttl soon is not a duration" in bad_ttl.stderr
        missing = zlayerctl(private_bus, "revoke", "ghost")
        assert missing.returncode != 0 and "there is no token named ghost" in missing.stderr
