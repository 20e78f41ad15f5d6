"""``zlayerctl validate FILE`` with the real zlayer-schedd answering Scheduler1.Validate:
the file is checked there, and this process loads none of click, pydantic, the spec models,
asyncio, sdbus or rich; what it prints is what the click command prints for the same answer.
(``tests/integration/test_validate_schedd.py`` holds schedd's answer to the local check.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.busdaemon import PrivateBus
from tests.ctl_runs import same_as_click
from tests.fresh_interpreter import modules_after
from tests.integration.test_schedd_spec_limits import schedd  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]
SPEC = str(REPO / "examples" / "static-web.zlayer.yml")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="Validate is root's, as Plan")

HEAVY = {"click", "pydantic", "shared.spec", "asyncio", "sdbus", "shared.bus", "rich"}


@pytest.mark.usefixtures("schedd")
def test_validate_through_schedd_imports_nothing_heavy(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    modules = modules_after(
        "import os\n"
        f"os.environ['ZLAYER_BUS_ADDRESS'] = {private_bus.address!r}\n"
        "from ctl.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
        "validate",
        SPEC,
    )
    assert "jeepney" in modules and "ctl.spec_check" in modules
    assert sorted(HEAVY & modules) == []


@pytest.mark.usefixtures("schedd")
def test_validate_through_schedd_says_what_the_click_command_says(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    env = {**os.environ, "ZLAYER_BUS_ADDRESS": private_bus.address}
    (tmp_path / "bad.zlayer.yml").write_text("version: v1\ndeployment: Bad Name\nservices: {}\n")
    for argv in (
        ["validate", SPEC],
        ["validate", SPEC, "--format", "json"],
        ["validate", "bad.zlayer.yml"],
        ["validate", "--format=json", "bad.zlayer.yml"],
    ):
        said = same_as_click(argv, env, tmp_path)
        assert said[0] == (1 if "bad.zlayer.yml" in argv else 0), said
