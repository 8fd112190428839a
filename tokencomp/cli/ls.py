"""``tokencomp ls``: the registered strategies and what they declare."""

from __future__ import annotations

import typer

from . import _render

__all__ = ["ls_command"]


def ls_command(
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table (the README's) instead."),
) -> None:
    """List the registered strategies and their capabilities (read from the classes)."""
    if markdown:
        typer.echo(_render.strategy_markdown())
    else:
        _render.strategy_table()
