"""zlayerctl --host against a real zlayer-apid alone on a private bus: the sentences.

With none of the other daemons running, apid answers with the problem
document for each missing one; zlayerctl must print the same sentence it
prints on the node for the same situation. A token that runs out of requests
gets one sentence naming the wait.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ctl.supervisor import find_executable
from shared.busdaemon import PrivateBus
from shared.paths import Paths
from tests.api_client import mint_token, running_apid

RATE = "rate_per_second = 0.2\nrate_burst = 5\n"


def _ctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [find_executable("zlayerctl"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _remote_env(token: str, tmp_path: Path) -> dict[str, str]:
    """zlayerctl's environment with ``token`` and no bus it could reach: only the API."""
    env = {k: v for k, v in os.environ.items() if k not in ("ZLAYER_HOST", "ZLAYER_TOKEN")}
    env.update(
        ZLAYER_TOKEN=token,
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        ZLAYER_BUS_ADDRESS="unix:path=/nonexistent/bus",
        ZLAYER_PREFIX=str(tmp_path / "nowhere"),
    )
    return env


def test_missing_daemons_and_the_rate_limit_read_as_one_sentence(
    private_bus: PrivateBus, zlayer_prefix: Paths, tmp_path: Path
) -> None:
    with running_apid(private_bus, zlayer_prefix, RATE) as apid:
        token = mint_token(private_bus.address, "cli", "admin")
        local_env = dict(os.environ, ZLAYER_BUS_ADDRESS=private_bus.address)
        remote_env = _remote_env(token, tmp_path)

        # schedd (agentd) is not on the bus: the same sentence either way
        for argv, daemon in (
            (["down", "web"], "schedd"),
            (["ps"], "schedd"),
            (["ps", "--containers"], "agentd"),
        ):
            local = _ctl(*argv, env=local_env)
            remote = _ctl("--host", apid.url, *argv, env=remote_env)
            assert local.returncode == remote.returncode == 1, argv
            assert f"zlayer-{daemon} is not on the bus" in local.stderr, argv
            assert remote.stderr == local.stderr, argv

        # the token's burst spent: 429 becomes a sentence with the wait in it
        answers = [_ctl("--host", apid.url, "ps", env=remote_env) for _ in range(5)]
        limited = [a for a in answers if "limiting this token's requests" in a.stderr]
        assert limited, [a.stderr for a in answers]
        assert limited[0].returncode == 1
        assert limited[0].stderr.startswith(
            f"error: the API at {apid.url} is limiting this token's requests; try again in "
        )
        assert limited[0].stderr.count("\n") == 1


def test_token_create_ls_revoke_through_the_api(
    private_bus: PrivateBus, zlayer_prefix: Paths, tmp_path: Path
) -> None:
    """``zlayerctl --host URL token ...`` with an admin token: made, listed and revoked by
    the node's apid (the new token then works and, revoked, is refused), never the bus."""
    with running_apid(private_bus, zlayer_prefix) as apid:
        admin = mint_token(private_bus.address, "cli-admin", "admin")
        env = _remote_env(admin, tmp_path)

        made = _ctl(
            "--host", apid.url, "token", "create", "made-remotely", "--role", "viewer",
            "--deployment", "web", env=env,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        viewer = made.stdout.strip()
        assert "token made-remotely: viewer of web" in made.stderr
        assert apid.call("GET", "/api/v1/deployments", viewer)[0] != 401

        listed = _ctl("--host", apid.url, "token", "ls", "--format", "json", env=env)
        assert listed.returncode == 0, listed.stderr
        rows = {row["name"]: row for row in json.loads(listed.stdout)}
        assert rows["made-remotely"]["deployments"] == ["web"]
        assert rows["made-remotely"]["role"] == "viewer"
        assert viewer not in listed.stdout

        revoked = _ctl("--host", apid.url, "token", "revoke", "made-remotely", env=env)
        assert (revoked.returncode, revoked.stdout) == (0, "revoked token made-remotely\n")
        assert apid.call("GET", "/api/v1/deployments", viewer)[0] == 401

        missing = _ctl("--host", apid.url, "token", "revoke", "nosuch", env=env)
        assert missing.returncode == 1
        assert "there is no token named nosuch" in missing.stderr
        assert missing.stderr.count("\n") == 1

        # a viewer's token may not make tokens: one sentence about the role
        refused = _ctl(
            "--host", apid.url, "token", "ls", env=dict(env, ZLAYER_TOKEN=mint_token(
                private_bus.address, "cli-viewer", "viewer"))
        )  # fmt: skip
        assert refused.returncode == 1
        assert "refused this to the token's role" in refused.stderr


def test_status_through_the_api_prints_the_rows_of_the_node(
    private_bus: PrivateBus, zlayer_prefix: Paths, tmp_path: Path
) -> None:
    """``status`` through the API: the same rows (apid running, the others not) and exit 3."""
    with running_apid(private_bus, zlayer_prefix) as apid:
        token = mint_token(private_bus.address, "cli-status", "viewer")
        local_env = dict(os.environ, ZLAYER_BUS_ADDRESS=private_bus.address)
        remote_env = _remote_env(token, tmp_path)
        local = _ctl("status", "--format", "json", env=local_env)
        remote = _ctl("--host", apid.url, "status", "--format", "json", env=remote_env)
        assert local.returncode == remote.returncode == 3, (local.stderr, remote.stderr)
        rows = [json.loads(r.stdout) for r in (local, remote)]
        for found in rows:
            for row in found:
                row.pop("uptime")  # seconds may tick between the two
        assert rows[0] == rows[1]
        assert {r["name"]: r["state"] for r in rows[1]}["apid"] == "running"

        table = _ctl("--host", apid.url, "status", env=remote_env)
        assert table.returncode == 3
        assert "zlayer-schedd" in table.stdout and "not running" in table.stdout
