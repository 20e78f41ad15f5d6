"""``zlayerctl up -b`` against the real zlayer-schedd on a private bus: one Deploy and the
warnings schedd stored with it, sent through the blocking bus reader (no asyncio, no sdbus
loaded), with the same lines, sentences and exit codes as before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctl.supervisor import find_executable
from shared.busdaemon import PrivateBus
from shared.paths import Paths
from tests.api_client import mint_token, running_apid
from tests.integration.test_schedd_spec_limits import schedd  # noqa: F401 (a fixture)

UP = [sys.executable, "-X", "importtime", "-c", "from ctl.main import main; main()", "up", "-b"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="Deploy is root's")

WARNED = """\
version: v1
deployment: warned
services:
  web:
    image: zlayer/busybox:latest
    scale: {mode: fixed, replicas: 1}
    node_selector: {labels: {zone: a}}
"""

REFUSED = """\
version: v1
deployment: refused
services:
  db:
    image: zlayer/busybox:latest
  web:
    image: zlayer/busybox:latest
    pid_mode: "container:db"
"""

INVALID = """\
version: v1
deployment: bad
services:
  web:
    image: zlayer/busybox:latest
    ports: [80]
"""


def _up(env: dict[str, str], path: Path | str) -> tuple[int, list[str], str]:
    """(exit code, what was said, the import trace)"""
    done = subprocess.run([*UP, str(path)], capture_output=True, text=True, env=env, timeout=60)
    trace = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    return done.returncode, said, "\n".join(trace)


@pytest.mark.usefixtures("schedd")
def test_up_b_deploys_warns_and_refuses_without_sdbus(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    env = {**os.environ, "ZLAYER_BUS_ADDRESS": private_bus.address}
    warned = tmp_path / "warned.zlayer.yml"
    warned.write_text(WARNED)
    code, said, trace = _up(env, warned)
    assert code == 0, said
    assert said[0].startswith(f"warning: {warned}:7:5: service web: node_selector places")
    assert said[1:] == ["deployed revision 1 of warned"]
    for heavy in ("sdbus", "asyncio", "shared.bus", "pydantic"):
        assert f" {heavy}\n" not in trace + "\n", heavy
    assert _up(env, warned)[1][1:] == ["deployed revision 2 of warned"]

    refused = tmp_path / "refused.zlayer.yml"
    refused.write_text(REFUSED)
    code, said, _ = _up(env, refused)
    assert code == 1
    assert len(said) == 1 and "pid_mode 'container:db' is not supported; use private" in said[0]

    invalid = tmp_path / "bad.zlayer.yml"
    invalid.write_text(INVALID)
    code, said, _ = _up(env, invalid)
    assert code == 1 and any(":6:" in line and "ports" in line for line in said), said
    assert said[-1].endswith("is not a valid deployment spec (1 problem)")


def test_up_b_without_daemons_says_so(tmp_path: Path) -> None:
    spec = tmp_path / "warned.zlayer.yml"
    spec.write_text(WARNED)
    env = {**os.environ, "ZLAYER_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    code, said, _ = _up(env, spec)
    assert code == 1 and len(said) == 1 and "not running" in said[0], said


CLICK = [
    sys.executable,
    "-X",
    "importtime",
    "-c",
    "import sys\nfrom ctl.main import _main_click\n_main_click(sys.argv[1:])",
    "up",
    "-b",
]


@pytest.mark.usefixtures("schedd")
def test_up_b_without_click_says_what_the_click_command_says(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    """The same spec through click and through ``ctl.up_background``: the same lines (the
    revision one more), exit codes and refusals; a spec schedd takes loads no click."""
    env = {**os.environ, "ZLAYER_BUS_ADDRESS": private_bus.address}
    env.pop("ZLAYER_HOST", None)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    for name, text in (("warned", WARNED), ("refused", REFUSED), ("bad", INVALID)):
        path = tmp_path / f"{name}.zlayer.yml"
        path.write_text(text)
        named = f"{tmp_path}//./{path.name}"  # the name sent is normalised as pathlib does
        slow = subprocess.run([*CLICK, named], capture_output=True, text=True, env=env)
        code, said, _ = _up(env, named)
        said_slow = [x for x in slow.stderr.splitlines() if not x.startswith("import time:")]
        if name == "warned":
            assert said_slow[0].startswith(f"warning: {path}:7:5: ")
            assert said_slow[-1] == "deployed revision 1 of warned"
            said_slow[-1] = "deployed revision 2 of warned"
        assert (code, said) == (slow.returncode, said_slow), name
        assert " click\n" in slow.stderr, name
    # a refusal reads the file with the spec models (ctl.spec_cmd) to locate its problems
    assert " click\n" not in _up(env, tmp_path / "warned.zlayer.yml")[2] + "\n"


def test_up_b_for_a_nodes_api_goes_through_the_api(
    private_bus: PrivateBus, zlayer_prefix: Paths, tmp_path: Path
) -> None:
    """--host and ZLAYER_HOST send up -b to apid (alone here: it says schedd is missing),
    never to this machine's bus (none here: that would say the daemons are not running)."""
    spec = tmp_path / "warned.zlayer.yml"
    spec.write_text(WARNED)
    with running_apid(private_bus, zlayer_prefix) as apid:
        token = mint_token(private_bus.address, "cli", "admin")
        env = {k: v for k, v in os.environ.items() if k not in ("ZLAYER_HOST", "ZLAYER_TOKEN")}
        env.update(
            ZLAYER_TOKEN=token,
            XDG_CONFIG_HOME=str(tmp_path / "config"),
            ZLAYER_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus",
        )
        for argv, extra in (
            (["--host", apid.url, "up", "-b", str(spec)], {}),
            (["up", "-b", str(spec)], {"ZLAYER_HOST": apid.url}),
        ):
            done = subprocess.run(
                [find_executable("zlayerctl"), *argv],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, **extra},
            )
            assert done.returncode == 1, done.stderr
            said = done.stderr.splitlines()
            assert said[0].startswith(f"warning: {spec}:7:5: "), said  # the file, read here
            assert said[1:] == [x for x in said[1:] if "zlayer-schedd is not on the bus" in x]
            assert len(said) == 2, said
