"""Logging: to the journal under systemd, to stderr otherwise."""

from __future__ import annotations

import logging
import os
import queue
import sys
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener


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


def logged_off_the_loop(name: str) -> Callable[[], None]:
    """Have logger ``name``'s records written by a thread of their own, to the root
    logger's handlers: a record a request (proxyd's access log) must not hold the
    event loop while the journal, or a pipe nobody reads fast enough, is slow to take
    it. The message is formatted where it is logged. The caller calls the function
    returned on its way out: it writes what is still queued and ends the thread."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, *logging.getLogger().handlers, respect_handler_level=True)
    logger = logging.getLogger(name)
    handler = QueueHandler(records)
    logger.addHandler(handler)
    logger.propagate = False
    listener.start()

    def stop() -> None:
        logger.removeHandler(handler)
        logger.propagate = True
        listener.stop()

    return stop
