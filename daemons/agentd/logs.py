"""The k8s-file logs conmon writes for each container, and their rotation.

Owns the log files in a bundle (``ctr.log`` and the rotated ``ctr.log.1`` …
``ctr.log.<kept>``, oldest last): their paths, reading them back as logical
lines, and rotation, which shifts the files and tells conmon (SIGUSR1) to
reopen. conmon's own ``--log-size-max`` truncates a file that grows past the
bound between two rotations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from daemons.agentd.oci import live_conmon
from shared import k8slog

LOG_NAME = "ctr.log"


def log_paths(bundle_dir: Path, kept: int) -> list[Path]:
    """The container's k8s-file logs, oldest first (rotated ones, then the current)."""
    current = bundle_dir / LOG_NAME
    rotated = [current.with_name(f"{LOG_NAME}.{n}") for n in range(kept, 0, -1)]
    return [p for p in [*rotated, current] if p.exists()]


def read_log(paths: list[Path]) -> list[k8slog.LogLine]:
    """Logical lines of these k8s-file logs, in order."""
    lines: list[str] = []
    for path in paths:
        with contextlib.suppress(OSError), open(path, errors="replace") as handle:
            lines.extend(handle)
    return list(k8slog.parse_lines(lines))


def _shift(current: Path, kept: int) -> None:
    for n in range(kept, 0, -1):
        older = current.with_name(f"{LOG_NAME}.{n}")
        if n == kept:
            with contextlib.suppress(FileNotFoundError):
                older.unlink()
        else:
            with contextlib.suppress(FileNotFoundError):
                older.replace(current.with_name(f"{LOG_NAME}.{n + 1}"))
    if kept > 0:
        current.replace(current.with_name(f"{LOG_NAME}.1"))


async def rotate(bundle_dirs: list[Path], size_max: int, kept: int, threshold: float) -> None:
    """Rotate the log of every bundle past ``threshold`` of ``size_max`` bytes whose
    conmon still runs: the current file becomes ``ctr.log.1`` (older ones shift,
    the oldest goes) and conmon is told to reopen."""
    for bundle_dir in bundle_dirs:
        current = bundle_dir / LOG_NAME
        try:
            size = current.stat().st_size
        except OSError:
            continue
        if size < size_max * threshold:
            continue
        conmon_pid = live_conmon(bundle_dir, bundle_dir.name)
        if not conmon_pid:
            continue
        await asyncio.to_thread(_shift, current, kept)
        with contextlib.suppress(ProcessLookupError):
            os.kill(conmon_pid, signal.SIGUSR1)
