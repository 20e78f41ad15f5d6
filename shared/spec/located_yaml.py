"""YAML read into plain data with every value's line and column: the one reader of user files.

Owns turning the text of a deployment spec or a build file (ZImagefile,
ZPipeline) into plain data (dicts, lists, scalars) while keeping where each
value and each key sits, so every later problem can name its line and
column; and turning what YAML itself refuses into located issues: bytes that
are not UTF-8, invalid YAML, an empty file, a second document, a duplicate
key, a key that is not a name, an unreadable or unsupported tag, an alias
that refers to itself, a document too large or deeply nested (alias bombs).

Reading never raises for a bad file: the problems are gathered in
:attr:`LocatedYaml.issues` and each caller raises its own error with them.
"""

from __future__ import annotations

from typing import Any

import yaml

from shared.spec.checks import PathSegment, format_path
from shared.spec.errors import SpecIssue

__all__ = ["LocatedYaml", "Mark", "PathKey"]

PathKey = tuple[PathSegment, ...]
Mark = tuple[int, int]  # 1-based line and column

# Enough for any real file; stops alias bombs ("billion laughs") and runaway nesting.
MAX_NODES = 200_000
MAX_DEPTH = 100

_COLLECTION_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("map", "omap", "pairs", "set", "seq")
)


class _Abort(Exception):
    """Stop converting a document that is too large or too deep."""


class LocatedYaml:
    """One YAML file being read: its plain data, where each node sits, its issues.

    ``what`` names the kind of file in sentences ("deployment spec",
    "ZImagefile"); ``empty`` is the sentence for a file with no document.
    """

    def __init__(self, filename: str, what: str, empty: str) -> None:
        self.filename = filename
        self.what = what
        self.empty = empty
        self.issues: list[SpecIssue] = []
        self.marks: dict[PathKey, Mark] = {}
        self.key_marks: dict[PathKey, Mark] = {}
        self._text = ""
        self._nodes = 0

    # ------------------------------------------------------------ locating

    def mark(self, path: PathKey, at_key: bool = False) -> Mark:
        """Where ``path`` (or its key) sits; else its nearest ancestor that was read."""
        if at_key and path in self.key_marks:
            return self.key_marks[path]
        for end in range(len(path), -1, -1):
            if path[:end] in self.marks:
                return self.marks[path[:end]]
        return (1, 1)

    def issue(self, path: PathKey, message: str, at_key: bool = False) -> SpecIssue:
        line, column = self.mark(path, at_key)
        return SpecIssue(self.filename, line, column, format_path(path), message)

    # ------------------------------------------------------------ reading

    def decode(self, raw: bytes) -> str | None:
        """The file's bytes as text; None (and an issue) when they are not UTF-8."""
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            self.issues.append(
                SpecIssue(self.filename, 1, 1, "", "the file is UTF-16; save it as UTF-8 text")
            )
            return None
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            byte = raw[exc.start]
            self.issues.append(
                SpecIssue(
                    self.filename,
                    line,
                    column,
                    "",
                    f"the file is not UTF-8 text (byte 0x{byte:02x}); save it as UTF-8",
                )
            )
            return None

    def load(self, text: str) -> tuple[Any, bool]:
        """Parse the first YAML document in ``text`` into plain data, recording marks.

        The flag says whether there is a document to validate at all.
        """
        self._text = text
        try:
            # The reader checks the first chunk for unprintable characters at once.
            loader = yaml.SafeLoader(text)
        except yaml.YAMLError as exc:
            self.issues.append(self._yaml_issue(exc))
            return None, False
        try:
            try:
                if not loader.check_node():
                    self.issues.append(SpecIssue(self.filename, 0, 0, "", self.empty))
                    return None, False
                root = loader.get_node()
                assert root is not None  # check_node() said there is one
                if loader.check_node():
                    start = loader.peek_event().start_mark  # type: ignore[no-untyped-call]
                    self.issues.append(
                        SpecIssue(
                            self.filename,
                            start.line + 1,
                            start.column + 1,
                            "",
                            f"a second YAML document starts here; a {self.what} is one "
                            "document: remove this `---` and what follows (or split the file)",
                        )
                    )
            except yaml.YAMLError as exc:
                self.issues.append(self._yaml_issue(exc))
                return None, False
            except RecursionError:
                self.issues.append(
                    SpecIssue(self.filename, 0, 0, "", "the YAML is nested too deeply")
                )
                return None, False
            try:
                return self._convert(loader, root, (), []), True
            except _Abort:
                return None, False
        finally:
            loader.dispose()

    def _yaml_issue(self, exc: yaml.YAMLError) -> SpecIssue:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None)
        context = getattr(exc, "context", None)
        if isinstance(exc, yaml.reader.ReaderError):
            before = self._text[: exc.position]
            line = before.count("\n") + 1
            column = exc.position - (before.rfind("\n") + 1) + 1
            return SpecIssue(
                self.filename,
                line,
                column,
                "",
                f"the file holds a control character YAML does not allow (U+{exc.character:04X})",
            )
        text = " ".join(str(part) for part in (context, problem) if part) or str(exc)
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
        return SpecIssue(self.filename, line, column, "", f"invalid YAML: {text}")

    def _convert(
        self, loader: yaml.SafeLoader, node: yaml.Node, path: PathKey, stack: list[int]
    ) -> Any:
        self._nodes += 1
        if self._nodes > MAX_NODES or len(stack) > MAX_DEPTH:
            self.issues.append(
                self._at(node, path, "the document is too large or too deeply nested")
            )
            raise _Abort
        self.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if id(node) in stack:
            self.issues.append(self._at(node, path, "an alias refers to itself"))
            return None
        if isinstance(node, yaml.ScalarNode):
            try:
                return loader.construct_object(node, deep=True)
            except Exception as exc:  # a bad !!tag or malformed !!int: still just a bad value
                problem = getattr(exc, "problem", None) or str(exc)
                self.issues.append(self._at(node, path, f"cannot read this value: {problem}"))
                return None
        if node.tag not in _COLLECTION_TAGS:
            self.issues.append(self._at(node, path, f"unsupported YAML tag `{node.tag}`"))
            return None
        stack.append(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [
                    self._convert(loader, item, (*path, index), stack)
                    for index, item in enumerate(node.value)
                ]
            assert isinstance(node, yaml.MappingNode)
            return self._convert_mapping(loader, node, path, stack)
        finally:
            stack.pop()

    def _convert_mapping(
        self, loader: yaml.SafeLoader, node: yaml.MappingNode, path: PathKey, stack: list[int]
    ) -> dict[str, Any]:
        try:
            loader.flatten_mapping(node)  # resolves `<<: *anchor` merges
        except yaml.YAMLError as exc:
            self.issues.append(self._yaml_issue(exc))
            return {}
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_mark = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if not isinstance(key_node, yaml.ScalarNode):
                self.issues.append(
                    SpecIssue(
                        self.filename,
                        *key_mark,
                        format_path(path),
                        "a key must be a plain name, not a list or mapping",
                    )
                )
                continue
            # Keys are names: take them as written, so `on:` or `1:` stay strings.
            key = str(key_node.value)
            child = (*path, key)
            if key in result:
                first = self.key_marks[child]
                self.issues.append(
                    SpecIssue(
                        self.filename,
                        *key_mark,
                        format_path(child),
                        f"duplicate key `{key}` (first at line {first[0]})",
                    )
                )
                continue
            self.key_marks[child] = key_mark
            result[key] = self._convert(loader, value_node, child, stack)
        return result

    def _at(self, node: yaml.Node, path: PathKey, message: str) -> SpecIssue:
        mark = node.start_mark
        return SpecIssue(self.filename, mark.line + 1, mark.column + 1, format_path(path), message)
