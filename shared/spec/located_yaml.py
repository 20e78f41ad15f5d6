"""YAML read into plain data with every value's line and column: the one reader of user files.

Owns turning the text of a deployment spec or a build file (ZImagefile,
ZPipeline) into plain data (dicts, lists, scalars) while keeping where each
value and each key sits, so every later problem can name its line and
column; and turning what YAML itself refuses into located issues: bytes that
are not UTF-8, invalid YAML, an empty file, a second document, a duplicate
key, a key that is not a name, an unreadable or unsupported tag, an alias
that refers to itself, a document too large or deeply nested (alias bombs).

The size limits (:mod:`shared.spec.limits`) are checked while the YAML is
parsed, event by event, so a hostile document is refused before it is built.

Reading never raises for a bad file: the problems are gathered in
:attr:`LocatedYaml.issues` and each caller raises its own error with them.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from shared.spec.checks import PathSegment, format_path
from shared.spec.errors import SpecIssue
from shared.spec.limits import MAX_DEPTH, MAX_EVENTS, MAX_NODES

__all__ = ["LocatedYaml", "Mark", "PathKey"]

PathKey = tuple[PathSegment, ...]
Mark = tuple[int, int]  # 1-based line and column

_SURROGATE = re.compile("[\ud800-\udfff]")

_COLLECTION_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("map", "omap", "pairs", "set", "seq")
)


# Up to this size, a file libyaml refuses is read again by PyYAML for its wording.
_REWORD_LIMIT = 16 * 1024
_TOO_DEEP = f"the YAML is nested more than {MAX_DEPTH} levels deep"


class _Abort(Exception):
    """Stop converting a document that is too large or too deep."""


class _TooLarge(yaml.YAMLError):
    """Stop parsing a document with too many events or too deep a nesting."""

    def __init__(self, mark: Any, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


class _PyParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


# libyaml's event parser where PyYAML was built with it (several times faster),
# else PyYAML's own. The composer is PyYAML's either way, so that every event
# passes through :meth:`_Loader.get_event`, which counts it.
_FAST_PARSER: Any
try:
    from yaml._yaml import CParser

    _FAST_PARSER = CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _FAST_PARSER = _PyParser


class _Loader(Composer, SafeConstructor, Resolver):
    """A safe loader that refuses a document past the event and depth limits as it parses.

    Mixed with a parser class by :func:`_loader_class`.
    """

    _parser: Any

    def __init__(self, stream: str) -> None:
        self._parser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.events = 0
        self.depth = 0

    def get_event(self) -> Any:
        event = self._parser.get_event(self)
        self.events += 1
        if self.events > MAX_EVENTS:
            raise _TooLarge(
                event.start_mark,
                f"the document has more than {MAX_EVENTS:,} YAML values; "
                "no deployment spec or build file needs that many",
            )
        if isinstance(event, yaml.CollectionStartEvent):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _TooLarge(event.start_mark, _TOO_DEEP)
        elif isinstance(event, yaml.CollectionEndEvent):
            self.depth -= 1
        return event


_LOADERS: dict[Any, type[_Loader]] = {}


def _loader_class(parser: Any) -> type[_Loader]:
    """``_Loader`` on top of ``parser`` (libyaml's or PyYAML's); its composer stays PyYAML's."""
    if parser not in _LOADERS:
        # The composer's methods come first: libyaml's parser has a composer of its own.
        _LOADERS[parser] = type("_Loader", (_Loader, parser), {"_parser": parser})
    return _LOADERS[parser]


_SURROGATE_MESSAGE = (
    "this text holds half of a UTF-16 surrogate pair (\\ud800-\\udfff), which is not a "
    "character; write the character itself or a \\U escape"
)


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
        if _SURROGATE.search(text):  # only a str built in Python can hold one
            self.issues.append(self._surrogate_issue(text))
            return None, False
        try:
            try:
                loader, root = self._compose(_FAST_PARSER, text)
            except _TooLarge:
                raise
            except yaml.YAMLError as exc:
                if _FAST_PARSER is _PyParser:
                    raise
                if "nesting depth" in str(getattr(exc, "problem", "")):
                    # libyaml scans ahead and stops at 1,000 levels, before the count here.
                    raise _TooLarge(getattr(exc, "problem_mark", None), _TOO_DEEP) from None
                if len(text) > _REWORD_LIMIT:
                    raise  # libyaml's own words: PyYAML would take seconds over a large file
                # libyaml words some problems differently: PyYAML says it, and where.
                loader, root = self._compose(_PyParser, text)
        except _TooLarge as exc:
            line, column = (exc.mark.line + 1, exc.mark.column + 1) if exc.mark else (0, 0)
            self.issues.append(SpecIssue(self.filename, line, column, "", exc.message))
            return None, False
        except yaml.YAMLError as exc:
            self.issues.append(self._yaml_issue(exc))
            return None, False
        except RecursionError:
            self.issues.append(SpecIssue(self.filename, 0, 0, "", "the YAML is nested too deeply"))
            return None, False
        if root is None:
            self.issues.append(SpecIssue(self.filename, 0, 0, "", self.empty))
            return None, False
        try:
            return self._convert(loader, root, (), []), True
        except _Abort:
            return None, False

    def _compose(self, parser: Any, text: str) -> tuple[_Loader, yaml.Node | None]:
        """The first document's node graph (None: no document); raises what YAML refuses."""
        loader: Any = _loader_class(parser)(text)
        try:
            if not loader.check_node():
                return loader, None
            root = loader.get_node()
            assert root is not None  # check_node() said there is one
            if loader.check_node():
                start = loader.peek_event().start_mark
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
            return loader, root
        finally:
            loader.dispose()  # the parser's state; the constructor stays usable

    def _yaml_issue(self, exc: yaml.YAMLError) -> SpecIssue:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None)
        context = getattr(exc, "context", None)
        if isinstance(exc, yaml.reader.ReaderError):
            before = self._text[: exc.position]  # PyYAML's reader: a position in characters
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

    def _convert(self, loader: _Loader, node: yaml.Node, path: PathKey, stack: list[int]) -> Any:
        self._nodes += 1
        if self._nodes > MAX_NODES or len(stack) > MAX_DEPTH:
            self.issues.append(
                self._at(
                    node,
                    path,
                    f"the document is too large or too deeply nested (more than {MAX_NODES:,} "
                    "values once its aliases are expanded)",
                )
            )
            raise _Abort
        self.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if id(node) in stack:
            self.issues.append(self._at(node, path, "an alias refers to itself"))
            return None
        if isinstance(node, yaml.ScalarNode):
            try:
                value = loader.construct_object(node, deep=True)
            except Exception as exc:  # a bad !!tag or malformed !!int: still just a bad value
                problem = getattr(exc, "problem", None) or str(exc)
                self.issues.append(self._at(node, path, f"cannot read this value: {problem}"))
                return None
            if isinstance(value, str) and _SURROGATE.search(value):
                self.issues.append(self._at(node, path, _SURROGATE_MESSAGE))
                return None
            return value
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
        self, loader: _Loader, node: yaml.MappingNode, path: PathKey, stack: list[int]
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
            if _SURROGATE.search(key):
                self.issues.append(
                    SpecIssue(self.filename, *key_mark, format_path(path), _SURROGATE_MESSAGE)
                )
                continue
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

    def _surrogate_issue(self, text: str) -> SpecIssue:
        match = _SURROGATE.search(text)
        assert match is not None
        before = text[: match.start()]
        line = before.count("\n") + 1
        column = match.start() - (before.rfind("\n") + 1) + 1
        return SpecIssue(self.filename, line, column, "", _SURROGATE_MESSAGE)

    def _at(self, node: yaml.Node, path: PathKey, message: str) -> SpecIssue:
        mark = node.start_mark
        return SpecIssue(self.filename, mark.line + 1, mark.column + 1, format_path(path), message)
