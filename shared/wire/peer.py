"""Node1's calls on a replica of another node (``shared.cluster.remote``): its logs,
an exec in it, its stats. JSON over gRPC, as every Node1 message."""

from __future__ import annotations

from typing import Literal

from shared.wire import Wire
from shared.wire.api import LogLine


class LogsRequest(Wire, frozen=True, kw_only=True):
    """``Logs``: a replica's lines, the last ``tail`` (None: all), then new ones with
    ``follow``."""

    replica: str
    tail: int | None = None
    follow: bool = False


class LogsChunk(Wire, frozen=True, kw_only=True):
    """Some of a replica's lines; ``caught_up`` on the one that ends what was written
    before the call (what follows is new)."""

    lines: list[LogLine] = []
    caught_up: bool = False


class ExecStart(Wire, frozen=True, kw_only=True):
    """``Exec``'s first message: what to run where. ``merge``: stderr comes as stdout
    (one ordered stream, as a terminal shows it)."""

    replica: str
    command: list[str]
    tty: bool = False
    cols: int = 0
    rows: int = 0
    merge: bool = False


class ExecInput(Wire, frozen=True, kw_only=True):
    """``Exec``'s messages after the first: stdin bytes, its end, a terminal size."""

    stdin: bytes = b""
    eof: bool = False
    cols: int = 0
    rows: int = 0


class ExecOutput(Wire, frozen=True, kw_only=True):
    """``Exec``'s answers: output as it comes, then one with the exit code."""

    stream: Literal["stdout", "stderr"] = "stdout"
    data: bytes = b""
    exit_code: int | None = None


class StatsRequest(Wire, frozen=True, kw_only=True):
    replica: str
