"""What a bad deployment spec raises: located issues gathered into one error.

Owns :class:`SpecIssue` (one problem: file, line, column, field path, message)
and :class:`SpecError` (every issue found in one file).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SpecError", "SpecIssue", "describe_value", "did_you_mean"]


_ESCAPES = {
    code: ascii(chr(code))[1:-1]
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0x85]
}


@dataclass(frozen=True, order=True)
class SpecIssue:
    """One problem in a spec file; ``line`` and ``column`` count from 1 (0: unknown)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __post_init__(self) -> None:
        # A value quoted into a message may hold a newline: an issue stays one line.
        for name in ("path", "message"):
            text = getattr(self, name)
            if not text.isprintable():
                object.__setattr__(self, name, text.translate(_ESCAPES))

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.column}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, str | int]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
        }


class SpecError(ValueError):
    """A spec that cannot be accepted; ``issues`` holds every located problem."""

    def __init__(self, issues: Sequence[SpecIssue], total: int | None = None) -> None:
        self.issues: list[SpecIssue] = list(issues)
        # Past a limit the last issue only counts the rest: ``total`` counts them all.
        self.total = len(self.issues) if total is None else total
        super().__init__(self.summary())

    def summary(self) -> str:
        count = self.total
        noun = "problem" if count == 1 else "problems"
        head = f"{count} {noun} in the deployment spec"
        return "\n".join([head, *(str(issue) for issue in self.issues)])

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


def describe_value(value: Any) -> str:
    """A YAML value as a sentence names it: "the number 3", "a mapping", "nothing"."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def did_you_mean(word: str, choices: Sequence[str], hints: Mapping[str, str] | None = None) -> str:
    """`` (did you mean `x`?)`` for a known synonym or the closest choice, or nothing."""
    hint = (hints or {}).get(word)
    if hint is not None and hint in choices:
        return f" (did you mean `{hint}`?)"
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
