"""``tokencomp report``: re-render ``report.md`` and the plots of a finished ablation from its results."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from tokencomp.errors import InputError

from . import _parse, _render
from ._app import UserError, console, user_errors

__all__ = ["report_command"]


def _example_image(meta: dict[str, Any]) -> Any:
    """The first image of the run, for the kept-token overlays (``None`` when it cannot be found)."""
    from tokencomp.analysis.data import BUNDLED_IMAGES, bundled_images, load_image_folder

    try:
        if meta.get("images", "bundled") == "bundled":
            return bundled_images(BUNDLED_IMAGES[:1])[0][1]
        return load_image_folder(Path(meta["images"]))[0][1]
    except (OSError, InputError, IndexError, KeyError):
        return None


def report_command(
    folder: Path = typer.Argument(..., help="A folder written by `tokencomp ablate --out`."),
    focus: Optional[str] = typer.Option(
        None, "--focus", help="Strategy compared with the references. [default: the run's, apet]"
    ),
) -> None:
    """Re-render report.md and the plots of a finished ablation from its saved results."""
    from tokencomp.analysis.grid import DEFAULT_FOCUS
    from tokencomp.analysis.report import write_report
    from tokencomp.analysis.results import load_results

    with user_errors():
        if focus is not None:
            _parse.strategy_names([focus])
        rows, meta = load_results(folder)
        _parse.output_folder(folder, "report folder")
        try:
            path = write_report(
                folder,
                rows,
                meta,
                _example_image(meta) if meta else None,
                focus=focus or meta.get("focus", DEFAULT_FOCUS),
            )
        except KeyError as exc:  # a row that passed the checks of load_results but lacks a field the report reads
            raise UserError(
                f"{str(folder / 'results.json')!r} is not a complete tokencomp results file: a row "
                f"lacks {exc}; run `tokencomp ablate --out {folder}` again to rewrite it"
            ) from None
    _render.ablation_tables(rows)
    console.print(f"report: {path}")
