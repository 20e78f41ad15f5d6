"""zlayerctl --host against a real zlayer-apid alone on a private bus: the sentences.

With none of the other daemons running, apid answers with the problem
document for each missing one; zlayerctl must print the same sentence it
prints on the node for the same situation. A token that runs out of requests
gets one sentence naming the wait.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from ctl.contexts import Target
from ctl.remote import RemoteClient
from ctl.supervisor import find_executable
from shared.bus import NotFoundError
from shared.busdaemon import PrivateBus
from shared.paths import Paths
from shared.wire.api import TokenCreate
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


def test_missing_daemons_and_the_rate_limit_read_as_one_sentence(
    private_bus: PrivateBus, zlayer_prefix: Paths, tmp_path: Path
) -> None:
    with running_apid(private_bus, zlayer_prefix, RATE) as apid:
        token = mint_token(private_bus.address, "cli", "admin")
        local_env = dict(os.environ, ZLAYER_BUS_ADDRESS=private_bus.address)
        remote_env = {
            k: v for k, v in os.environ.items() if k not in ("ZLAYER_PREFIX", "ZLAYER_HOST")
        }
        remote_env.update(ZLAYER_TOKEN=token, XDG_CONFIG_HOME=str(tmp_path / "config"))

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


def test_tokens_through_the_api_as_on_the_bus(
    private_bus: PrivateBus, zlayer_prefix: Paths
) -> None:
    """``client.api`` through the API: the token calls ``zlayerctl token`` makes on the bus."""
    with running_apid(private_bus, zlayer_prefix) as apid:
        admin = mint_token(private_bus.address, "cli-admin", "admin")

        async def calls() -> None:
            client = RemoteClient(found=Target(apid.url, admin))
            issued = await client.api.create_token(
                TokenCreate(name="made-remotely", role="viewer", deployments=["web"])
            )
            assert issued.token and issued.info.role == "viewer"
            listed = {t.name: t for t in await client.api.list_tokens()}
            assert listed["made-remotely"].deployments == ["web"]
            revoked = await client.api.revoke_token("made-remotely")
            assert revoked.name == "made-remotely"
            with pytest.raises(NotFoundError, match="there is no token named nosuch"):
                await client.api.revoke_token("nosuch")

        asyncio.run(calls())
