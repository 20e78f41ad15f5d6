"""Durations and sizes: parsing, printing back, and refusing nonsense."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.spec import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1h 30m", timedelta(hours=1, minutes=30)),
        ("2d", timedelta(days=2)),
        ("1.5s", timedelta(seconds=1.5)),
        ("0s", timedelta()),
    ],
)
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "bad", ["30", 30, "", "s", "5 minutes", "-1s", "1x", True, None, [1], "99999999999999d"]
)
def test_durations_refuse_nonsense(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text", ["500ms", "30s", "5m", "1h", "1h30m", "2d", "1m5s"])
def test_durations_print_back_the_same(text: str) -> None:
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64Mi", 64 * 1024**2),
        ("1Gi", 1024**3),
        ("512M", 512 * 1000**2),
        ("1G", 1000**3),
        ("10Ki", 10240),
        ("1k", 1000),
        ("1MiB", 1024**2),
        ("1.5Gi", 1536 * 1024**2),
        (4096, 4096),
        ("4096", 4096),
    ],
)
def test_sizes_parse(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["lots", "1Q", "-1Mi", -5, 1.5, True, None, "Mi", float("inf"), float("nan")]
)
def test_sizes_refuse_nonsense(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_sizes_print_in_the_largest_exact_unit() -> None:
    assert format_size(64 * 1024**2) == "64Mi"
    assert format_size(1024**3) == "1Gi"
    assert format_size(1536 * 1024**2) == "1536Mi"
    assert format_size(1000) == 1000
    assert format_size(0) == 0
