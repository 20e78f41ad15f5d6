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

# The root logger's own handlers once write_logs_off_the_loop has put its queue in
# their place: where every writer thread writes.
_root_targets: list[logging.Handler] | None = None


class _DroppingQueueHandler(QueueHandler):
    """Queues a record, or drops it (counted) when the writer is QUEUED_RECORDS behind:
    memory stays bounded while the log's reader is stuck."""

    def __init__(
        self, records: queue.Queue[logging.LogRecord | None], dropped: Callable[[], None]
    ) -> None:
        super().__init__(records)
        self._dropped = dropped
        self._lost = 0  # dropped since the writer last said so
        self._lost_lock = threading.Lock()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lost_lock:
                self._lost += 1
            self._dropped()

    def take_lost(self) -> int:
        with self._lost_lock:
            lost, self._lost = self._lost, 0
        return lost


def _write_off_the_loop(
    logger: logging.Logger, targets: list[logging.Handler], dropped: Callable[[], None]
) -> tuple[_DroppingQueueHandler, Callable[[], None]]:
    """``logger``'s records queued for a thread of their own, which writes them to
    ``targets``; (the queue's handler, the function that stops the thread)."""
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUED_RECORDS)
    handler = _DroppingQueueHandler(records, dropped)

    def write(record: logging.LogRecord) -> None:
        for target in targets:
            if record.levelno >= target.level:
                target.handle(record)

    def run() -> None:
        while (record := records.get()) is not None:
            if lost := handler.take_lost():
                write(_lost_record(logger.name, lost, record.created))
            write(record)

    writer = threading.Thread(target=run, name=f"log {logger.name or 'root'}", daemon=True)
    writer.start()

    def stop() -> None:
        with contextlib.suppress(queue.Full):
            records.put(None, timeout=STOP_WAIT)
        writer.join(STOP_WAIT)

    return handler, stop


def _lost_record(name: str, lost: int, created: float) -> logging.LogRecord:
    record = logging.LogRecord(
        "zlayer.logs",
        logging.WARNING,
        __file__,
        0,
        "dropped %d log records%s: %d were already waiting for the log to take them",
        (lost, f" of {name}" if name else "", QUEUED_RECORDS),
        None,
    )
    record.created = created
    return record


def write_logs_off_the_loop(dropped: Callable[[], None]) -> Callable[[], None]:
    """Have every record of this process written by a thread of its own, to the root
    logger's handlers (call it after :func:`setup_logging`): a daemon's event loop
    must not wait while the journal, or a pipe nobody reads, is slow to take a line.
    A record that finds the writer QUEUED_RECORDS behind is dropped, ``dropped()``
    called, and the writer says how many it lost once it takes records again.

    The caller calls the function returned on its way out: the writer writes what
    is queued and ends, given STOP_WAIT seconds.
    """
    global _root_targets
    root = logging.getLogger()
    targets = list(root.handlers)
    handler, stop_writer = _write_off_the_loop(root, targets, dropped)
    for target in targets:
        root.removeHandler(target)
    root.addHandler(handler)
    _root_targets = targets

    def stop() -> None:
        global _root_targets
        root.removeHandler(handler)
        stop_writer()
        for target in targets:
            root.addHandler(target)
        _root_targets = None

    return stop


def logged_off_the_loop(name: str, dropped: Callable[[], None]) -> Callable[[], None]:
    """Have logger ``name``'s records written by a thread of their own, to the root
    logger's handlers, through a queue of their own: a record a request (proxyd's
    access log) must not hold the event loop while the journal is slow to take it,
    and a flood of them must not crowd the daemon's own lines out of the root's
    queue (:func:`write_logs_off_the_loop`). As there, a record that finds the
    writer QUEUED_RECORDS behind is dropped and ``dropped()`` called.

    The caller calls the function returned on its way out: the writer writes what
    is queued and ends, given STOP_WAIT seconds (a writer stuck on a reader that
    never reads is left behind; it does not keep the process from ending).
    """
    logger = logging.getLogger(name)
    targets = list(_root_targets if _root_targets is not None else logging.getLogger().handlers)
    handler, stop_writer = _write_off_the_loop(logger, targets, dropped)
    logger.addHandler(handler)
    logger.propagate = False

    def stop() -> None:
        logger.removeHandler(handler)
        logger.propagate = True
        stop_writer()

    return stop
