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
    assert sink.written == [f"line {n}" for n in range(11)]
    # Stopped: the logger is as it was, its records go to the root's handlers again.
    assert log.propagate and not log.handlers
