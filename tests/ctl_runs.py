"""zlayerctl run twice in a fresh interpreter: once as it runs (the command line read
without click where it can be) and once straight through click, to compare what each says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ctl import readargs

REPO = Path(__file__).resolve().parents[1]

FAST = "from ctl.main import main; main()"
CLICK = (
    "import sys\nfrom ctl.main import _main_click\nfrom ctl.readargs import take_host_option\n"
    "_main_click(take_host_option(sys.argv[1:]))"
)

Said = tuple[int, str, str]  # exit code, stdout, stderr


def run(code: str, argv: list[str], env: dict[str, str], cwd: Path = REPO) -> Said:
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def same_as_click(argv: list[str], env: dict[str, str], cwd: Path = REPO) -> Said:
    """What zlayerctl says for ``argv``, checked to be what the click command says."""
    fast = run(FAST, argv, env, cwd)
    clicked = run(CLICK, argv, env, cwd)
    assert fast == clicked, (fast, clicked)  # pytest rewrites no assert here: show both
    return fast


def no_daemons(tmp_path: Path) -> dict[str, str]:
    """An environment with no bus to reach and no contexts file: this node, no daemons."""
    env = {k: v for k, v in os.environ.items() if k != readargs.HOST_ENV}
    env["ZLAYER_BUS_ADDRESS"] = f"unix:path={tmp_path}/no-bus"
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    return env


def main_without_daemons(tmp_path: Path, *lines: str) -> str:
    """Python that runs zlayerctl's main as :func:`no_daemons` sets it up, after ``lines``
    (for :func:`tests.fresh_interpreter.modules_after`, which runs it in its own process)."""
    return (
        "import os\n"
        f"os.environ['ZLAYER_BUS_ADDRESS'] = 'unix:path={tmp_path}/no-bus'\n"
        f"os.environ['XDG_CONFIG_HOME'] = {str(tmp_path / 'config')!r}\n"
        "os.environ.pop('ZLAYER_HOST', None)\n"
        + "".join(f"{line}\n" for line in lines)
        + "from ctl.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass"
    )
