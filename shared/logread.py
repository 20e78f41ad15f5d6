"""Reading a replica's log files, for ``zlayerctl logs`` and the REST API's logs route.

agentd names a replica's files (``Agent1.LogPaths``, oldest first, in the
k8s-file format of :mod:`shared.k8slog`); both readers take them straight
from disk, so following a busy replica never floods the bus. Following polls
the newest file and starts over when it is rotated or truncated. The file
reads of :func:`follow` run in a worker thread: apid's event loop never
waits on the disk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Literal

from shared.k8slog import LogLine, parse_lines
from shared.wire.api import LogLine as WireLine

FOLLOW_POLL = 0.2  # seconds between looks at a followed file


def read_records(paths: Iterable[str]) -> Iterator[str]:
    """Every record of the files, in order; a file rotated away meanwhile is skipped."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                yield from handle
        except FileNotFoundError:
            continue


def read_lines(paths: Iterable[str], tail: int | None = None) -> list[LogLine]:
    """The logical lines of the files (only the last ``tail`` when it is set)."""
    lines = list(parse_lines(read_records(paths)))
    if tail is None:
        return lines
    return lines[-tail:] if tail > 0 else []


def history(paths: list[str], tail: int | None, follow: bool) -> tuple[int | None, list[LogLine]]:
    """Blocking: where following the newest file starts (None: not followed) and the lines
    so far. The start is taken first, so no line falls in between."""
    start = end_offset(paths[-1]) if follow and paths else None
    return start, read_lines(paths, tail)


def wire_line(replica: str, line: LogLine) -> WireLine:
    """A line as the REST API's logs stream and another node's ``Logs`` carry it."""
    stream: Literal["stdout", "stderr"] = "stderr" if line.stream == "stderr" else "stdout"
    when = line.time.timestamp() if line.time else None
    return WireLine(replica=replica, stream=stream, time=when, line=line.text)


def end_offset(path: str) -> int:
    """Where a follower of ``path`` starts: its current end (0 if it does not exist yet)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _read_from(path: str, position: int, inode: int) -> tuple[str, int, int]:
    """What was appended to ``path`` since ``position``: (text, new position, inode).
    A new inode or a shorter file is read from its start; a missing one reads nothing."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "", position, inode
    if info.st_ino != inode or info.st_size < position:
        inode, position = info.st_ino, 0
    if info.st_size == position:
        return "", position, inode
    with open(path, encoding="utf-8", errors="replace") as handle:
        handle.seek(position)
        chunk = handle.read()
        return chunk, handle.tell(), inode


async def follow(path: str, offset: int, poll: float = FOLLOW_POLL) -> AsyncIterator[LogLine]:
    """The lines appended to ``path`` after ``offset``, for as long as the caller reads;
    the file is reopened when it is rotated or truncated."""
    position = offset
    inode = await asyncio.to_thread(lambda: os.stat(path).st_ino if os.path.exists(path) else 0)
    partial = ""
    while True:
        await asyncio.sleep(poll)
        chunk, position, inode = await asyncio.to_thread(_read_from, path, position, inode)
        if not chunk:
            continue
        records = (partial + chunk).split("\n")
        partial = records.pop()
        for line in parse_lines(r for r in records if r):
            yield line
