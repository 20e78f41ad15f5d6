"""One real ZLayer daemon, started by a test on its private bus and always stopped.

For tests about a single daemon (its bind address, its limits) that need no
supervisor: the process logs to ``<prefix>/<name>.log``, and is terminated
(killed after a grace) by its PID when the test ends, failed or not.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctl.supervisor import find_executable
from shared.busdaemon import PrivateBus
from shared.paths import Paths


@contextmanager
def daemon_process(
    name: str, bus: PrivateBus, paths: Paths
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``zlayer-<name>`` running on ``bus``: (the process, its log file)."""
    log_path = paths.prefix / f"{name}.log"
    env = {**os.environ, "ZLAYER_BUS_ADDRESS": bus.address}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [find_executable(f"zlayer-{name}")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            yield process, log_path
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
