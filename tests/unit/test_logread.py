"""shared.logread: the one reader of replica log files (zlayerctl logs and apid's logs route)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from shared import logread
from shared.k8slog import LogLine


def record(text: str, stream: str = "stdout", tag: str = "F") -> str:
    return f"2026-01-02T03:04:05.123456789Z {stream} {tag} {text}\n"


def test_read_lines_joins_partials_across_rotated_files_and_keeps_the_tail(
    tmp_path: Path,
) -> None:
    old, new = tmp_path / "ctr.log.1", tmp_path / "ctr.log"
    old.write_text(record("one") + record("tw", tag="P"))
    new.write_text(record("o") + record("oops", "stderr"))
    paths = [str(old), str(tmp_path / "rotated-away"), str(new)]
    lines = logread.read_lines(paths)
    assert [(line.stream, line.text) for line in lines] == [
        ("stdout", "one"),
        ("stdout", "two"),
        ("stderr", "oops"),
    ]
    assert lines[0].time is not None and lines[0].time.microsecond == 123456
    assert [line.text for line in logread.read_lines(paths, 2)] == ["two", "oops"]
    assert logread.read_lines(paths, 0) == []  # -n 0: nothing, not everything


def test_follow_sees_appends_then_a_rotation_and_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    path.write_text(record("before"))

    async def scenario() -> list[str]:
        seen: list[LogLine] = []

        async def reader() -> None:
            async for line in logread.follow(str(path), logread.end_offset(str(path)), 0.01):
                seen.append(line)

        async def until(count: int) -> None:
            async with asyncio.timeout(10):
                while len(seen) < count:
                    await asyncio.sleep(0.01)

        task = asyncio.create_task(reader())
        try:
            await asyncio.sleep(0.05)
            with path.open("a") as handle:  # a record written in two pieces
                handle.write(record("appended")[:20])
                handle.flush()
                await asyncio.sleep(0.05)
                handle.write(record("appended")[20:])
            await until(1)
            os.rename(path, tmp_path / "ctr.log.1")  # rotated: a new file takes its name
            path.write_text(record("rotated"))
            await until(2)
            path.write_text("")  # truncated, then written again (shorter than before)
            await asyncio.sleep(0.05)
            path.write_text(record("cut"))
            await until(3)
        finally:
            task.cancel()
        return [line.text for line in seen]

    assert asyncio.run(scenario()) == ["appended", "rotated", "cut"]
