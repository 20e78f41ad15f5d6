"""What a bad deployment spec raises: located issues gathered into one error.

Owns :class:`SpecIssue` (one problem: file, line, column, field path, message)
and :class:`SpecError` (every issue found in one file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SpecError", "SpecIssue"]


@dataclass(frozen=True, order=True)
class SpecIssue:
    """One problem in a spec file; ``line`` and ``column`` count from 1 (0: unknown)."""

    file: str
    line: int
    column: int
    path: str
    message: str

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

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues: list[SpecIssue] = list(issues)
        super().__init__(self.summary())

    def summary(self) -> str:
        count = len(self.issues)
        noun = "problem" if count == 1 else "problems"
        head = f"{count} {noun} in the deployment spec"
        return "\n".join([head, *(str(issue) for issue in self.issues)])

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)
