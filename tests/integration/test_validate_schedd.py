"""``zlayerctl validate`` asks the real zlayer-schedd (Scheduler1.Validate), which has the
spec models loaded, and says exactly what it says when it checks the file itself: the same
stdout, stderr (sentences, file:line:col marks) and exit code, for valid specs, specs with
warnings and refusals, invalid ones, and files that are not specs. Without schedd, and for
what is not a small regular UTF-8 file, it checks the file itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctl.spec_cmd import SCHEDD_CHECKS_AT_MOST
from shared.busdaemon import PrivateBus
from shared.spec.limits import MAX_SPEC_BYTES
from tests.integration.test_schedd_spec_limits import schedd  # noqa: F401 (a fixture)
from tests.unit.test_spec_support import UPSTREAM_KEYS

REPO = Path(__file__).resolve().parents[2]
ZLAYERCTL = [sys.executable, "-c", "from ctl.main import main; main()"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="Validate is root's, as Plan")

INVALID = """\
version: v1
deployment: Bad Name
services:
  web:
    image: {name: ""}
    scale: {mode: fixed, replicas: -1}
    endpoints:
      - {name: http, protocol: http, port: 99999}
  "tab\\there":
    image: nginx:1
"""


JSON_TOO = ("shop.zlayer.yml", "invalid.zlayer.yml", "empty.zlayer.yml")


def _specs(directory: Path) -> list[str]:
    files = {
        "shop.zlayer.yml": UPSTREAM_KEYS,
        "invalid.zlayer.yml": INVALID,
        "empty.zlayer.yml": "",
        "notyaml.zlayer.yml": "services: [\n",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    (directory / "latin1.zlayer.yml").write_bytes("deployment: caf\xe9\n".encode("latin-1"))
    os.mkfifo(directory / "fifo.zlayer.yml")
    examples = sorted(str(p) for p in (REPO / "examples").glob("*.zlayer.yml"))
    return [*examples, *files, "latin1.zlayer.yml", "fifo.zlayer.yml", "missing.zlayer.yml"]


def _validate(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [*ZLAYERCTL, "validate", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


@pytest.mark.usefixtures("schedd")
def test_schedd_checks_as_zlayerctl_does(private_bus: PrivateBus, tmp_path: Path) -> None:
    with_schedd = {**os.environ, "ZLAYER_BUS_ADDRESS": private_bus.address, "COLUMNS": "200"}
    alone = {**with_schedd, "ZLAYER_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    for spec in _specs(tmp_path):
        formats = ("table", "json") if spec in JSON_TOO else ("table",)
        for fmt in formats:
            asked = _validate(with_schedd, tmp_path, spec, "--format", fmt)
            here = _validate(alone, tmp_path, spec, "--format", fmt)
            assert asked == here, (spec, fmt)
    # the cases above cover each outcome
    assert _validate(alone, tmp_path, "shop.zlayer.yml")[0] == 0
    assert "(up refuses it on this node)" in _validate(alone, tmp_path, "shop.zlayer.yml")[2]
    code, _, said = _validate(alone, tmp_path, "invalid.zlayer.yml")
    assert code == 1 and "invalid.zlayer.yml:2:13: " in said
    assert _validate(alone, tmp_path, "fifo.zlayer.yml")[0] == 1


@pytest.mark.usefixtures("schedd")
def test_with_schedd_the_spec_models_are_not_loaded(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    """What makes it faster: the models load in schedd, which has them, not here."""
    spec = str(REPO / "examples" / "static-web.zlayer.yml")
    traced = [sys.executable, "-X", "importtime", "-c", "from ctl.main import main; main()"]
    env = {**os.environ, "ZLAYER_BUS_ADDRESS": private_bus.address}
    asked = subprocess.run([*traced, "validate", spec], capture_output=True, text=True, env=env)
    assert asked.returncode == 0, asked.stderr
    assert "valid, deployment" in asked.stdout
    assert "shared.spec.models" not in asked.stderr and "pydantic" not in asked.stderr

    env["ZLAYER_BUS_ADDRESS"] = f"unix:path={tmp_path}/no-bus"
    here = subprocess.run([*traced, "validate", spec], capture_output=True, text=True, env=env)
    assert here.returncode == 0 and "shared.spec.models" in here.stderr


def test_what_schedd_is_sent_stays_within_its_limit() -> None:
    assert SCHEDD_CHECKS_AT_MOST == MAX_SPEC_BYTES
