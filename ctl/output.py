"""How zlayerctl prints: tables and colour for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for scripts",
)

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A coloured table on a terminal; plain aligned, never truncated columns otherwise.

    Cells may carry rich markup (``[green]running[/]``); it is dropped when
    the output is not a terminal.
    """
    cells = [[str(cell) for cell in row] for row in rows]
    if console.is_terminal:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in columns:
            table.add_column(column)
        for row in cells:
            table.add_row(*row)
        console.print(table)
        return
    plain = [list(columns)] + [[Text.from_markup(cell).plain for cell in row] for row in cells]
    widths = [max(len(row[i]) for row in plain) for i in range(len(columns))]
    for row in plain:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")


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
