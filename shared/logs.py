"""Logging: to the journal under systemd, to stderr otherwise."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from logging.handlers import QueueHandler


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


QUEUED_RECORDS = 10_000  # records waiting for the writer before new ones are dropped
STOP_WAIT = 5.0  # seconds the writer is given to write what is queued at the end


class _DroppingQueueHandler(QueueHandler):
    """Queues a record, or drops it (counted) when the writer is QUEUED_RECORDS behind:
    memory stays bounded while the log's reader is stuck."""

    def __init__(
        self, records: queue.Queue[logging.LogRecord | None], dropped: Callable[[], None]
    ) -> None:
        super().__init__(records)
        self._dropped = dropped

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._dropped()


def logged_off_the_loop(name: str, dropped: Callable[[], None]) -> Callable[[], None]:
    """Have logger ``name``'s records written by a thread of their own, to the root
    logger's handlers: a record a request (proxyd's access log) must not hold the
    event loop while the journal, or a pipe nobody reads fast enough, is slow to take
    it. The message is formatted where it is logged; a record that finds the writer
    QUEUED_RECORDS behind is dropped and ``dropped()`` called.

    The caller calls the function returned on its way out: the writer writes what
    is queued and ends, given STOP_WAIT seconds (a writer stuck on a reader that
    never reads is left behind; it does not keep the process from ending).
    """
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUED_RECORDS)
    handlers = list(logging.getLogger().handlers)

    def write() -> None:
        while (record := records.get()) is not None:
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    writer = threading.Thread(target=write, name=f"log {name}", daemon=True)
    logger = logging.getLogger(name)
    handler = _DroppingQueueHandler(records, dropped)
    logger.addHandler(handler)
    logger.propagate = False
    writer.start()

    def stop() -> None:
        logger.removeHandler(handler)
        logger.propagate = True
        with contextlib.suppress(queue.Full):
            records.put(None, timeout=STOP_WAIT)
        writer.join(STOP_WAIT)

    return stop
