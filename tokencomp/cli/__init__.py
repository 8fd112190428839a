"""The ``tokencomp`` command line: ``ls``, ``ablate``, ``report``, ``bench`` and ``generate``.

One module per command (its options, checks and steps; heavy imports inside the command), beside what
they share: :mod:`._app` (the console and the one user-error boundary), :mod:`._parse` (option values),
:mod:`._options` (``ablate``'s flags > TOML > defaults), :mod:`._render` (every table printed).
"""

from __future__ import annotations

import os

import typer

from ._app import UserError
from ._render import strategy_markdown
from .ablate import ablate_command
from .bench import bench_command
from .generate import generate_command
from .ls import ls_command
from .report import report_command

__all__ = ["UserError", "app", "main", "strategy_markdown"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # the help texts are plain text: "[default: 64]" must not be read as rich markup (and vanish)
    rich_markup_mode=None,
    help="Compare visual-token compression strategies for vision-language models.",
)
for _name, _command in (
    ("ls", ls_command),
    ("ablate", ablate_command),
    ("report", report_command),
    ("bench", bench_command),
    ("generate", generate_command),
):
    app.command(_name)(_command)

# PyTorch's profiler (the peak-memory measurements of bench and ablate) logs two "USDT ... profiler_start /
# profiler_stop" lines per measurement through Kineto; above its last level (5) Kineto logs nothing. Set
# for the tokencomp program only, and only where the user has not chosen a level.
_KINETO_QUIET = "6"


def main() -> None:
    """Entry point of the ``tokencomp`` script."""
    os.environ.setdefault("KINETO_LOG_LEVEL", _KINETO_QUIET)
    app()
