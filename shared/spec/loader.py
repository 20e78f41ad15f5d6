"""Reading a ``*.zlayer.yml`` file into a :class:`DeploymentSpec`, or into located errors.

Owns everything between the bytes on disk and the validated model: reading
the file (decoded and parsed by :mod:`shared.spec.located_yaml`, which keeps
every node's line and column, so every problem has one), turning pydantic's
errors into plain sentences with a field path and, for an unknown key, a
did-you-mean (with pointed hints for docker-compose habits), and printing a
spec back out (YAML, JSON) or its JSON Schema.

Nothing here raises anything but :class:`SpecError` for a bad spec: a broken
encoding, invalid YAML, two documents or an empty file all become located
issues.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from shared.spec.checks import PathSegment, Problem, format_path, semantic_problems
from shared.spec.errors import SpecError, SpecIssue, describe_value, did_you_mean
from shared.spec.limits import (
    MAX_ISSUES,
    MAX_SERVICES,
    MAX_SPEC_BYTES,
    FileReadError,
    format_bytes,
    read_regular_file,
)
from shared.spec.located_yaml import LocatedYaml, PathKey
from shared.spec.models import KEY_ALIASES, DeploymentSpec, ServiceSpec

__all__ = [
    "dump_spec",
    "load_spec",
    "parse_spec",
    "spec_json_schema",
    "spec_to_data",
]

# docker-compose keys people carry over, and where ZLayer keeps the same idea.
_SERVICE_HINTS: dict[str, str] = {
    "volumes": "storage",
    "ports": "endpoints",
    "environment": "env",
    "depends_on": "depends",
    "healthcheck": "health",
    "restart": "restart_policy",
    "networks": "network",
    "container_name": "hostname",
    "entrypoint": "command",
    "working_dir": "command",
    "read_only": "read_only_root_fs",
}
_VALUE_HINTS: dict[str, str] = {
    "exec": "command",
    "cmd": "command",
    "init.exec": "init.run",
    "auto": "adaptive",
    "static": "fixed",
    "replicated": "fixed",
    "volume": "named",
}


# ---------------------------------------------------------------- public API


def load_spec(path: str | os.PathLike[str]) -> DeploymentSpec:
    """Read and validate the spec at ``path``; raise :class:`SpecError` with every issue."""
    filename = os.fspath(path)
    display = filename  # as the user wrote it, so editors can jump to file:line:col
    try:
        raw = read_regular_file(filename, MAX_SPEC_BYTES)
    except FileReadError as exc:
        raise SpecError([SpecIssue(display, 0, 0, "", str(exc))]) from None
    return parse_spec(raw, display)


def parse_spec(text: str | bytes, filename: str = "<spec>") -> DeploymentSpec:
    """Validate spec ``text`` (str, or bytes still to decode); ``filename`` labels issues."""
    document = _Document(filename)
    too_large = _too_large(text, filename)
    if too_large is not None:
        raise SpecError([too_large])
    decoded = document.decode(text) if isinstance(text, bytes) else text
    if decoded is None:
        raise SpecError(document.issues)
    data, readable = document.load(decoded)
    issues = list(document.issues)
    if readable and not isinstance(data, dict):
        issues.append(
            document.issue(
                (),
                "the top level must be a mapping with `version`, `deployment` and "
                f"`services`, not {describe_value(data)}",
            )
        )
    elif readable and _service_count(data) > MAX_SERVICES:
        # Refused before validation, which would take seconds and much memory.
        issues.append(
            document.issue(
                ("services",),
                f"{_service_count(data):,} services; a deployment holds at most "
                f"{MAX_SERVICES:,}: split it into several deployments",
                at_key=True,
            )
        )
    elif readable:
        # Validate even when reading found problems (a second document, a
        # duplicate key), so the file's other errors are reported in the same run;
        # a value already reported as unreadable is not reported again.
        try:
            spec = document.validate(data)
        except SpecError as exc:
            seen = {(i.line, i.column) for i in issues}
            issues += [i for i in exc.issues if (i.line, i.column) not in seen]
        else:
            if not issues:
                return spec
    shown = _at_most(issues, filename, document.unshown)
    raise SpecError(shown, len(issues) + document.unshown)


def _service_count(data: dict[str, Any]) -> int:
    services = data.get("services")
    return len(services) if isinstance(services, dict) else 0


def _at_most(issues: list[SpecIssue], filename: str, unshown: int) -> list[SpecIssue]:
    """The issues in file order, at most :data:`MAX_ISSUES` of them and a count of the rest."""
    # Issues about the whole file (line 0) stand alone, or last.
    ordered = sorted(issues, key=lambda i: (i.line or 1 << 62, i.column))
    unshown += max(0, len(ordered) - MAX_ISSUES)
    shown = ordered[:MAX_ISSUES]
    if unshown:
        shown.append(
            SpecIssue(
                filename,
                0,
                0,
                "",
                f"{unshown:,} more problem{'s' * (unshown != 1)} not shown; fix these first",
            )
        )
    return shown


def _too_large(text: str | bytes, filename: str) -> SpecIssue | None:
    """An issue when ``text`` is past :data:`MAX_SPEC_BYTES` (checked before any parsing)."""
    size = len(text)
    if isinstance(text, str) and size <= MAX_SPEC_BYTES < size * 4:
        # A character is up to four bytes: count the bytes only when it matters.
        size = len(text.encode("utf-8", "surrogatepass"))
    if size <= MAX_SPEC_BYTES:
        return None
    return SpecIssue(
        filename,
        0,
        0,
        "",
        f"the spec is larger than {format_bytes(MAX_SPEC_BYTES)}, the most a deployment spec "
        "may hold; split it into several deployments",
    )


def spec_to_data(spec: DeploymentSpec) -> dict[str, Any]:
    """The spec as plain JSON-able data, defaults filled in, durations and sizes
    written back as ``30s`` and ``512Mi``; unset optional fields are left out."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def dump_spec(spec: DeploymentSpec, fmt: Literal["yaml", "json"] = "yaml") -> str:
    """The normalised spec as YAML or JSON text."""
    data = spec_to_data(spec)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the input format, for editors and CI."""
    schema = DeploymentSpec.model_json_schema(mode="validation", by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://zlayer.dev/schema/deployment-v1.json",
        "title": "ZLayer deployment spec (v1)",
        **{k: v for k, v in schema.items() if k != "title"},
    }


# ---------------------------------------------------------------- validation


class _Document(LocatedYaml):
    """One spec file being read (:class:`LocatedYaml`), then validated with located issues."""

    def __init__(self, filename: str) -> None:
        super().__init__(
            filename,
            "deployment spec",
            "the file is empty; a deployment spec starts with `version: v1`",
        )
        self.unshown = 0  # problems found but not described, past MAX_ISSUES

    def validate(self, data: dict[str, Any]) -> DeploymentSpec:
        issues: list[SpecIssue] = []
        for problem in semantic_problems(data):
            issues.append(self._problem_issue(problem))
        spec: DeploymentSpec | None = None
        try:
            spec = DeploymentSpec.model_validate(data, context={"semantics_checked": True})
        except ValidationError as exc:
            # Describing an error costs far more than finding it (a did-you-mean
            # for each unknown key): describe the first ones and count the rest.
            errors = exc.errors(include_url=False)
            self.unshown += max(0, len(errors) - MAX_ISSUES)
            issues += _merge(self._error_issue(error, data) for error in errors[:MAX_ISSUES])
        if issues or spec is None:
            unique = sorted(set(issues), key=lambda i: (i.line, i.column, i.path, i.message))
            raise SpecError(unique)
        return spec

    def _problem_issue(self, problem: Problem) -> SpecIssue:
        return self.issue(problem.path, problem.message, problem.at_key)

    def _error_issue(self, error: ErrorDetails, data: Any) -> _Located:
        path, unresolved, _ = _locate(error["loc"], data)
        kind = error["type"]
        ctx = error.get("ctx") or {}
        value = error.get("input")
        if kind == "missing" and unresolved:
            field = unresolved[-1]
            line, column = self.mark(path)
            full = (*path, field) if isinstance(field, str) else path
            return _Located(
                SpecIssue(
                    self.filename, line, column, format_path(full), "required field is missing"
                ),
                kind,
            )
        if kind == "extra_forbidden":
            return _Located(self.issue(path, _unknown_key(path, data), at_key=True), kind)
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            discriminator = str(ctx.get("discriminator", "")).strip("'")
            tags = _quoted(str(ctx.get("expected_tags", ""))) or _tags_at(path, data)
            if kind == "union_tag_not_found":
                message = (
                    f"`{discriminator}` is missing: say which kind this is ({', '.join(tags)})"
                )
                return _Located(self.issue((*path, discriminator), message), kind)
            tag = str(ctx.get("tag", ""))
            message = f"`{tag}` is not a known {discriminator}; expected one of {', '.join(tags)}"
            message += did_you_mean(tag, tags, _VALUE_HINTS)
            return _Located(self.issue((*path, discriminator), message), kind)
        return _Located(self.issue(path, _message(kind, error["msg"], ctx, value)), kind)


class _Located(typing.NamedTuple):
    issue: SpecIssue
    kind: str


_TYPE_NOUNS: dict[str, str] = {
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "int_parsing": "a whole number",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "none_required": "nothing",
}


def _merge(located: Iterator[_Located]) -> list[SpecIssue]:
    """Union members each report a type mismatch at the same place; say it once."""
    result: list[SpecIssue] = []
    nouns: dict[tuple[int, int, str], tuple[int, list[str], str]] = {}
    for item in located:
        issue = item.issue
        if item.kind in _TYPE_NOUNS:
            key = (issue.line, issue.column, issue.path)
            got = issue.message.split(", got ", 1)[-1]
            if key in nouns:
                index, words, _ = nouns[key]
                if _TYPE_NOUNS[item.kind] not in words:
                    words.append(_TYPE_NOUNS[item.kind])
                result[index] = SpecIssue(
                    issue.file,
                    issue.line,
                    issue.column,
                    issue.path,
                    f"expected {' or '.join(words)}, got {got}",
                )
                continue
            nouns[key] = (len(result), [_TYPE_NOUNS[item.kind]], got)
        result.append(issue)
    return result


def _message(kind: str, msg: str, ctx: dict[str, Any], value: Any) -> str:
    if kind in _TYPE_NOUNS:
        return f"expected {_TYPE_NOUNS[kind]}, got {describe_value(value)}"
    if kind == "literal_error":
        choices = _quoted(str(ctx.get("expected", "")))
        shown = value if isinstance(value, str) else describe_value(value)
        message = f"`{shown}` is not one of {', '.join(choices)}"
        if isinstance(value, str):
            message += did_you_mean(value, choices, _VALUE_HINTS)
        return message
    if kind in ("value_error", "assertion_error"):
        return re.sub(r"^(Value|Assertion) error, ", "", msg)
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("greater than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}, got {value!r}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "finite_number":
        return "must be a finite number"
    return msg[:1].lower() + msg[1:]


def _quoted(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text)


# ---------------------------------------------------------------- locating errors


def _locate(loc: tuple[int | str, ...], data: Any) -> tuple[PathKey, tuple[int | str, ...], bool]:
    """Map a pydantic error location onto the document.

    Pydantic adds segments of its own (the tag of a discriminated union, the
    name of a union member) and sees folded aliases under their field name;
    walk the raw data, keep the segments that exist there, translate the rest
    where possible, and return what could not be placed.
    """
    path: list[PathSegment] = []
    unresolved: list[int | str] = []
    at_key = False
    current = data
    for segment in loc:
        if segment == "[key]":
            at_key = True
            continue
        if isinstance(current, dict):
            if segment in current:
                path.append(segment)
                current = current[segment]
                continue
            alias = next((a for a, f in KEY_ALIASES.items() if f == segment and a in current), None)
            if alias is not None:
                path.append(alias)
                current = current[alias]
                continue
        elif isinstance(current, list):
            if isinstance(segment, int) and 0 <= segment < len(current):
                path.append(segment)
                current = current[segment]
                continue
            # env in list form is validated as a map: find the item by name
            if isinstance(segment, str) and path and path[-1] == "env":
                index = next(
                    (
                        i
                        for i, item in enumerate(current)
                        if isinstance(item, dict) and item.get("name") == segment
                    ),
                    None,
                )
                if index is not None:
                    path += [index, "value"]
                    current = current[index].get("value")
                    continue
        unresolved.append(segment)
    return tuple(path), tuple(unresolved), at_key


def _annotation_at(path: PathKey, data: Any, pick_last: bool = True) -> Any:
    """The declared type of the field at ``path``, following the data through unions."""
    annotation: Any = DeploymentSpec
    current = data
    for segment in path:
        annotation = _pick(annotation, current)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            name = KEY_ALIASES.get(str(segment), str(segment))
            field = next(
                (f for n, f in annotation.model_fields.items() if (f.alias or n) == name), None
            )
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        else:
            return None
        try:
            current = current[segment]
        except (KeyError, IndexError, TypeError):
            current = None
    return _pick(annotation, current) if pick_last else annotation


def _pick(annotation: Any, value: Any) -> Any:
    """Strip Annotated/Optional; from a union take the model the data names by tag."""
    while get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        members = [_pick(m, value) for m in get_args(annotation) if m is not type(None)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if isinstance(value, dict) and models:
            for model in models:
                for tag_field in ("type", "mode"):
                    field = model.model_fields.get(tag_field)
                    if (
                        field is not None
                        and get_origin(field.annotation) is Literal
                        and value.get(tag_field, field.default) in get_args(field.annotation)
                    ):
                        return model
            return models[0]
        return members[0] if len(members) == 1 else None
    return annotation


def _known_keys(annotation: Any) -> list[str]:
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return []
    keys = [field.alias or name for name, field in annotation.model_fields.items()]
    if annotation is ServiceSpec:
        keys += [*KEY_ALIASES, "host_network"]
    return keys


def _tags_at(path: PathKey, data: Any) -> list[str]:
    """The tags a discriminated union at ``path`` accepts, in declaration order."""
    tags: list[str] = []
    for member in _members(_annotation_at(path, data, pick_last=False)):
        for tag_field in ("type", "mode"):
            field = member.model_fields.get(tag_field)
            if field is not None and get_origin(field.annotation) is Literal:
                tags += [str(t) for t in get_args(field.annotation)]
    return tags


def _members(annotation: Any) -> list[type[BaseModel]]:
    while get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _unknown_key(path: PathKey, data: Any) -> str:
    key = str(path[-1]) if path else ""
    parent = _annotation_at(path[:-1], data)
    message = f"unknown key `{key}`"
    if parent is ServiceSpec:
        if key == "deploy":
            replicas = _deploy_replicas(path, data)
            return (
                f"{message}: ZLayer has no `deploy`; for a replica count write "
                f"`scale: {{mode: fixed, replicas: {replicas}}}`"
            )
        if key == "runtime":
            return (
                f"{message}: WebAssembly settings go in `wasm` (with `service_type: wasm_http`); "
                "the runtime is chosen from the image"
            )
        if key in _SERVICE_HINTS:
            return f"{message} (did you mean `{_SERVICE_HINTS[key]}`?)"
    close = difflib.get_close_matches(key, _known_keys(parent), n=1, cutoff=0.6)
    return message + (f" (did you mean `{close[0]}`?)" if close else "")


def _deploy_replicas(path: PathKey, data: Any) -> str:
    current = data
    for segment in path:
        current = current[segment]
    if isinstance(current, dict) and isinstance(current.get("replicas"), int):
        return str(current["replicas"])
    return "N"
