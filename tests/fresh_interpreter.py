"""What a fresh interpreter has imported after running some code: for the tests that
hold zlayerctl's and the daemons' start-up to what they need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "MODULES "


def modules_after(code: str, *argv: str, timeout: float = 60.0) -> set[str]:
    """sys.modules of a new interpreter that ran ``code`` (with ``argv`` as sys.argv[1:]).

    ``code`` may exit (a command's ``main()``); the modules are printed on the
    way out. An exception in ``code`` fails the test with its traceback.
    """
    probe = (
        "import atexit, json, sys\n"
        f"sys.argv = ['zlayerctl', *{list(argv)!r}]\n"
        "atexit.register(lambda: print("
        f"'\\n{MARKER}' + json.dumps(sorted(sys.modules)), flush=True))\n"
        f"{code}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    marker = result.stdout.rfind(MARKER)
    assert marker >= 0, result.stdout + result.stderr
    return set(json.loads(result.stdout[marker + len(MARKER) :]))


def import_all(*modules: str) -> str:
    """Code importing ``modules``, for :func:`modules_after`."""
    return "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
