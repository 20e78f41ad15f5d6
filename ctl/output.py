"""How zlayerctl prints: tables and colour for people, JSON for scripts.

click is imported with the first use of ``format_option`` (a command's
definition), so the read commands' bodies print without it; rich only when
it is needed: for a terminal, for a table on a terminal, or for markup this
module cannot render as plain text itself.
Output to a pipe or a file (``--format json``, plain tables, one-line
messages) never imports it, and reads exactly as rich would have written it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar, cast

if TYPE_CHECKING:
    from rich.console import Console

    # The --format option of the commands that print tables; made with click on first use
    # (module __getattr__ below), so the read commands' bodies import no click.
    format_option: Callable[[Callable[..., Any]], Callable[..., Any]]


def _format_option() -> Any:
    import click

    return click.option(
        "--format",
        "output_format",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="table for people, json for scripts",
    )


_made: dict[str, Any] = {}

T = TypeVar("T")


def __getattr__(name: str) -> Any:
    if name == "format_option":
        if name not in _made:
            _made[name] = _format_option()
        return _made[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# rich's console markup: a tag, with the backslashes that may escape it.
_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")
# rich's emoji codes (``:smile:``); text holding one goes through rich.
_EMOJI = re.compile(r":(\S*?)(?:-(?:emoji|text))?:")
# The codes in rich's table without a letter (the rest all have one).
_EMOJI_WITHOUT_LETTER = frozenset({"100", "1234", "+1", "-1", "__1"})
# Every character of the codes in rich's table (it looks a code up lowercased): a name
# with another (an image reference's "host:5000/app:1") names no emoji.
_EMOJI_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_+-.!#&()*\u2019ãåçéíô")
# rich's width for output that is not a terminal, unless COLUMNS says otherwise.
_DEFAULT_WIDTH = 80


_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def escape(text: str) -> str:
    """``text`` with its square brackets escaped, as ``rich.markup.escape`` (without rich)."""

    def escape_backslashes(match: re.Match[str]) -> str:
        backslashes, tag = match.groups()
        return f"{backslashes}{backslashes}\\{tag}"

    text = _ESCAPE.sub(escape_backslashes, text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


def _may_be_emoji(text: str) -> bool:
    # rich looks for codes in each piece of text between tags: across a tag, a colon this
    # scan passes over can open a code there, so names are ruled out only without tags
    tagless = "[" not in text
    for match in _EMOJI.finditer(text):
        name = match.group(1).lower()
        if tagless and not _EMOJI_NAME_CHARACTERS.issuperset(name):
            continue
        if name in _EMOJI_WITHOUT_LETTER or any(c.isalpha() for c in name):
            return True
    return False


def plain(markup: str) -> str | None:
    """``markup`` without its tags, as ``rich.text.Text.from_markup(markup).plain``.

    None when rich is needed to say: an emoji code, or a closing tag that
    closes nothing (rich raises an error for that).
    """
    if _may_be_emoji(markup):
        return None
    if "[" not in markup:
        return markup
    parts: list[str] = []
    opened: list[str] = []
    position = 0
    for match in _TAG.finditer(markup):
        full, escapes, tag = match.groups()
        start, end = match.span()
        parts.append(markup[position:start])
        position = end
        if escapes:
            backslashes, escaped = divmod(len(escapes), 2)
            parts.append("\\" * backslashes)
            if escaped:
                parts.append(full[len(escapes) :])
                continue
        if tag.startswith("/"):
            name = tag[1:].strip()
            if name.startswith("@"):
                return None
            if name:
                if name not in opened:
                    return None
                opened.reverse()
                opened.remove(name)
                opened.reverse()
            elif opened:
                opened.pop()
            else:
                return None
        elif not tag.startswith("@"):
            opened.append(tag.partition("=")[0])
        else:
            return None
    parts.append(markup[position:])
    return "".join(parts)


class _LazyConsole:
    """A rich ``Console`` made on first use.

    ``print`` of plain-renderable markup to a stream that is not a terminal
    writes the text itself, without importing rich, when rich would not
    wrap it either; everything else goes to the real console.
    """

    def __init__(self, *, stderr: bool = False, soft_wrap: bool = False) -> None:
        self._stderr = stderr
        self._soft_wrap = soft_wrap
        self._console: Console | None = None

    def _file(self) -> IO[str]:
        return sys.stderr if self._stderr else sys.stdout

    def _real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, soft_wrap=self._soft_wrap)
        return self._console

    @property
    def is_terminal(self) -> bool:
        """As rich's ``Console.is_terminal``, asking rich only when the environment forces it."""
        if self._console is None and not _environment_decides():
            try:
                return self._file().isatty()
            except ValueError:
                return False
        return self._real().is_terminal

    def print(self, *objects: Any, **options: Any) -> None:
        text = self._plain_line(objects, options)
        if text is None:
            self._real().print(*objects, **options)
            return
        stream = self._file()
        stream.write(text + "\n")
        stream.flush()

    def _plain_line(self, objects: tuple[Any, ...], options: dict[str, Any]) -> str | None:
        """The line rich would write for ``print(*objects)``, if it can be had without rich."""
        if self._console is not None or options.keys() - {"highlight"}:
            return None
        if options.get("highlight", True) or not all(isinstance(o, str) for o in objects):
            return None
        if self.is_terminal:
            return None
        rendered = [plain(o) for o in objects]
        if any(r is None for r in rendered):
            return None
        text = " ".join(cast("list[str]", rendered))
        if any(c < " " and c != "\n" for c in text):
            return None  # tabs to expand, control codes to strip: rich's business
        # rich wraps at the width, measuring wide characters as two cells
        lines = text.split("\n")
        if not self._soft_wrap and (not text.isascii() or any(len(x) > _width() for x in lines)):
            return None
        return text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real(), name)


def _environment_decides() -> bool:
    """Whether rich's terminal detection would look past ``isatty()``."""
    return any(os.environ.get(k) is not None for k in ("TTY_COMPATIBLE", "FORCE_COLOR")) or (
        "ipykernel" in sys.modules
    )


def _width() -> int:
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else _DEFAULT_WIDTH


# Typed as rich consoles; rich is imported on their first use.
console = cast("Console", _LazyConsole())
err_console = cast("Console", _LazyConsole(stderr=True, soft_wrap=True))


def print_json(data: Any) -> None:
    import json  # only for JSON output

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_rows(
    output_format: str,
    items: Sequence[T],
    columns: Sequence[str],
    row: Callable[[T], Sequence[Any]],
) -> None:
    """``items`` as JSON for ``--format json``, else a table of ``row(item)`` under ``columns``."""
    if output_format == "json":
        from shared.wire import to_builtins  # only for JSON output

        print_json(to_builtins(items))
        return
    print_table(columns, [row(item) for item in items])


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A coloured table on a terminal; plain aligned, never truncated columns otherwise.

    Cells may carry rich markup (``[green]running[/]``); it is dropped when
    the output is not a terminal.
    """
    cells = [[str(cell) for cell in row] for row in rows]
    if console.is_terminal:
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in columns:
            table.add_column(column)
        for row in cells:
            table.add_row(*row)
        console.print(table)
        return
    plain_rows = [list(columns)] + [[_plain_cell(cell) for cell in row] for row in cells]
    widths = [max(len(row[i]) for row in plain_rows) for i in range(len(columns))]
    for row in plain_rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")


def _plain_cell(cell: str) -> str:
    text = plain(cell)
    if text is None:
        from rich.text import Text

        text = Text.from_markup(cell).plain
    return text


def human_size(size: int) -> str:
    """A byte count as people read it: 512 B, 1.2 MB (powers of 1000)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def short_id(digest: str) -> str:
    """An image id or digest as shown in tables: 12 hex digits."""
    return digest.removeprefix("sha256:")[:12]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one sentence to stderr and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise SystemExit(code)
