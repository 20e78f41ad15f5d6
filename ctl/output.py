"""How zlayerctl prints: tables and colour for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for scripts",
)

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], styles: dict[int, str] | None = None
) -> None:
    """A table when a terminal is attached; plain aligned columns otherwise."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def fail(message: str, code: int = 1) -> None:
    """Print one sentence to stderr and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise SystemExit(code)
