"""shared.logs.logged_off_the_loop: a logger's records written by a thread of their own,
a bounded queue between (records past it dropped and counted), all of it written at the
end."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from shared import logs


class _StuckHandler(logging.Handler):
    """A log sink that takes its first record, then waits until let go (a reader that
    stopped reading)."""

    def __init__(self) -> None:
        super().__init__()
        self.took_first = threading.Event()
        self.go_on = threading.Event()
        self.written: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.written.append(record.getMessage())
        self.took_first.set()
        self.go_on.wait(30)


@pytest.fixture
def sink() -> Iterator[_StuckHandler]:
    handler = _StuckHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        handler.go_on.set()
        root.removeHandler(handler)


def test_records_past_the_bound_are_dropped_and_counted_and_the_rest_written_at_the_end(
    sink: _StuckHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "QUEUED_RECORDS", 10)
    dropped: list[int] = []
    stop = logs.logged_off_the_loop("zlayer.test.offloop", lambda: dropped.append(1))
    log = logging.getLogger("zlayer.test.offloop")
    log.warning("line %d", 0)
    assert sink.took_first.wait(10)  # the writer holds line 0, stuck in the sink
    for n in range(1, 14):  # 10 queue, 3 do not fit
        log.warning("line %d", n)
    assert len(dropped) == 3
    sink.go_on.set()
    stop()
    # The writer says what it dropped before the first record it writes after.
    lost = "dropped 3 log records of zlayer.test.offloop: 10 were already waiting for the log"
    assert sink.written[:2] == ["line 0", f"{lost} to take them"]
    assert sink.written[2:] == [f"line {n}" for n in range(1, 11)]
    # Stopped: the logger is as it was, its records go to the root's handlers again.
    assert log.propagate and not log.handlers


def test_the_whole_log_goes_through_one_writer_and_its_handlers_come_back_at_the_stop(
    sink: _StuckHandler,
) -> None:
    """write_logs_off_the_loop puts a queue in the root's handlers' place; a logger with
    a writer of its own (proxyd's access log) writes to those handlers, not the queue."""
    sink.go_on.set()  # a sink that keeps up
    root = logging.getLogger()
    dropped: list[int] = []
    stop = logs.write_logs_off_the_loop(lambda: dropped.append(1))
    try:
        assert sink not in root.handlers
        stop_access = logs.logged_off_the_loop("zlayer.test.access", lambda: dropped.append(2))
        logging.getLogger("zlayer.test.daemon").warning("from the daemon")
        logging.getLogger("zlayer.test.access").warning("from a request")
        stop_access()
    finally:
        stop()
    assert sink in root.handlers and len(root.handlers) == len(set(root.handlers))
    assert sorted(sink.written) == ["from a request", "from the daemon"]
    assert dropped == []
