"""Logging: to the journal under systemd, to stderr otherwise."""

from __future__ import annotations

import logging
import os
import sys


def under_systemd(environ: dict[str, str] | None = None) -> bool:
    """True when systemd started this process as a unit."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID"))


def setup_logging(identifier: str, level: str = "info") -> None:
    """Send records to the journal when stderr is connected to it, else to stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level.upper())
    if os.environ.get("JOURNAL_STREAM"):
        from cysystemd.journal import JournaldLogHandler

        root.addHandler(JournaldLogHandler(identifier=identifier))  # type: ignore[no-untyped-call]
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s {identifier}[%(process)d] %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    root.addHandler(handler)
