"""The rows of a running ablation, saved every few seconds and on Ctrl-C."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from ._app import say

__all__ = ["Autosave", "interrupted"]


class Autosave:
    """Collects finished rows and writes them to ``target`` at most every ``every`` seconds.

    Parameters
    ----------
    target : Path
        The ``--out`` folder.
    rows : list of dict
        The rows already saved there (kept, and saved again with the new ones).
    meta : dict
        ``run.json``'s metadata.
    """

    def __init__(self, target: Path, rows: list[dict[str, Any]], meta: dict[str, Any], every: float = 5.0) -> None:
        self.target, self.rows, self.meta, self.every = target, rows, meta, every
        self.unsaved = 0  # rows finished since the last save
        self._last = 0.0

    def add(self, row: dict[str, Any]) -> None:
        """Keep ``row``; save when the last save is older than ``every`` seconds."""
        self.rows.append(row)
        self.unsaved += 1
        if time.monotonic() - self._last > self.every:
            self.save()

    def save(self) -> None:
        from tokencomp.analysis.results import save_results

        save_results(self.target, self.rows, self.meta)
        self.unsaved = 0
        self._last = time.monotonic()


def interrupted(saver: Optional[Autosave]) -> None:
    """Ctrl-C during ``ablate``: save the rows finished since the last save, say how to continue, exit 130."""
    if saver is None or not saver.rows:
        say("interrupted before any cell finished; nothing was written")
        raise typer.Exit(code=130)
    try:
        if saver.unsaved:
            saver.save()
    except (OSError, KeyboardInterrupt) as exc:  # a second Ctrl-C while saving: the files stay as they were
        reason = "interrupted again" if isinstance(exc, KeyboardInterrupt) else str(exc)
        say(
            f"interrupted; the cells finished since the last save were not saved to {saver.target} ({reason}); "
            "run the same command with --resume to continue from the saved ones"
        )
        raise typer.Exit(code=130) from None
    say(
        f"interrupted: {len(saver.rows)} finished cells are saved in {saver.target}; run the same command with "
        "--resume to finish the rest"
    )
    raise typer.Exit(code=130)
