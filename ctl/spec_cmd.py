"""Placeholder: spec commands (validate, spec dump, spec schema) land here."""

from __future__ import annotations

import click


@click.command()
def validate() -> None:
    """Check a deployment spec."""


@click.group()
def spec() -> None:
    """Show a deployment spec normalised, or its JSON Schema."""
