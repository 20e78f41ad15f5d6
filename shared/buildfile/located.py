"""Build files (ZImagefile, ZPipeline) read from YAML with every problem located.

Owns reading a build file (its YAML read by :mod:`shared.spec.located_yaml`,
which keeps each node's line and column), the :class:`Strict` model base (an
unknown key is an error with a did-you-mean), turning pydantic's errors into
:class:`~shared.spec.SpecIssue` s, and :class:`BuildFileError`, whose text is
one sentence: the first problem with its file, line and column, and how many
more there are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from shared.spec.checks import format_path
from shared.spec.errors import SpecIssue, describe_value, did_you_mean
from shared.spec.located_yaml import LocatedYaml, PathKey
from shared.userfile import FileReadError, read_regular_file

_MAX_BYTES = 1 << 20  # a build file larger than this is not one


class BuildFileError(ValueError):
    """A build file that cannot be used; its text is one sentence."""

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.line, i.column))
        super().__init__(self.sentence())

    def sentence(self) -> str:
        first = str(self.issues[0])
        more = len(self.issues) - 1
        if more:
            first += f" (and {more} more problem{'s' if more > 1 else ''})"
        return first

    def __str__(self) -> str:
        return self.sentence()


def file_error(filename: str, message: str, line: int = 0, column: int = 0) -> BuildFileError:
    return BuildFileError([SpecIssue(filename, line, column, "", message)])


class Strict(BaseModel):
    """A model of a build file: unknown keys are refused with the closest known one."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [field.alias or name for name, field in cls.model_fields.items()]
            for key in data:
                if key not in known:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key `{key}`{hint}",
                        {"key": str(key), "hint": did_you_mean(str(key), known)},
                    )
        return data


class Document(LocatedYaml):
    """One YAML build file (:class:`LocatedYaml`); what it cannot read is a BuildFileError."""

    def __init__(self, filename: str, what: str) -> None:
        super().__init__(filename, what, f"the {what} is empty")  # "ZImagefile", "ZPipeline"

    @classmethod
    def read(cls, path: str | os.PathLike[str], what: str) -> tuple[Document, Any]:
        filename = os.fspath(path)
        try:
            # A FIFO, a device or a huge file is refused without blocking or reading it all.
            raw = read_regular_file(filename, _MAX_BYTES, what)
        except FileReadError as exc:
            reason = str(exc)
            raise file_error(
                filename, f"no such {what}" if reason == "no such file" else reason
            ) from None
        document = cls(filename, what)
        text = document.decode(raw)
        if text is None:
            raise BuildFileError(document.issues)
        return document, document.parse(text)

    def parse(self, text: str) -> Any:
        """The plain data of ``text``; a :class:`BuildFileError` if it is not readable YAML."""
        data, readable = self.load(text)
        if self.issues or not readable:
            raise BuildFileError(self.issues)
        return data

    def error_at(self, path: PathKey, message: str, at_key: bool = False) -> BuildFileError:
        return BuildFileError([self.issue(path, message, at_key)])

    def validation_error(self, exc: ValidationError, data: Any) -> BuildFileError:
        """Each pydantic error as a located sentence; a union's alternatives said once."""
        seen: dict[PathKey, int] = {}
        issues: list[SpecIssue] = []
        for error in exc.errors():
            path, _ = _locate(error["loc"], data)
            ctx = error.get("ctx") or {}
            if error["type"] == "unknown_key":
                path = (*path, str(ctx["key"]))
                issue = self.issue(path, error["msg"], at_key=True)
            elif error["type"] == "missing":
                field = error["loc"][-1]
                line, column = self.mark(path)
                shown = format_path((*path, field))
                issue = SpecIssue(self.filename, line, column, shown, "required key is missing")
            else:
                issue = self.issue(path, _message(error["type"], error["msg"], error["input"]))
            if path in seen:
                continue  # the other members of a union failing at the same place
            seen[path] = len(issues)
            issues.append(issue)
        return BuildFileError(issues)


def _locate(loc: tuple[int | str, ...], data: Any) -> tuple[PathKey, list[int | str]]:
    """The part of pydantic's location that exists in the data (union member names dropped)."""
    path: list[str | int] = []
    rest: list[int | str] = []
    current = data
    for segment in loc:
        in_dict = isinstance(current, dict) and segment in current
        in_list = isinstance(current, list) and isinstance(segment, int) and segment < len(current)
        if in_dict or in_list:
            path.append(segment)
            current = current[segment]
        else:
            rest.append(segment)
    return tuple(path), rest


_NOUNS = {
    "string_type": "a string",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}


def _message(kind: str, msg: str, value: Any) -> str:
    if kind in _NOUNS:
        return f"expected {_NOUNS[kind]}, got {describe_value(value)}"
    if kind in ("value_error", "assertion_error"):
        return msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion")) else msg
    return msg[:1].lower() + msg[1:]


def display_path(path: Path, base: Path | None = None) -> str:
    """``path`` relative to ``base`` when inside it, for shorter messages."""
    if base is not None:
        try:
            return str(path.relative_to(base))
        except ValueError:
            pass
    return str(path)
