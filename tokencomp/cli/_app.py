"""What every command shares: the console, :class:`UserError` and the one user-error boundary."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from tokencomp.errors import InputError

__all__ = ["UserError", "console", "fail", "say", "user_errors"]

# A pipe or CI log gets a wide console instead of rich's 80 columns, so tables stay readable.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)


class UserError(Exception):
    """A mistake in the command line: reported on one line, exit code 2."""


def say(message: str) -> None:
    """Print one line of prose (rich markup allowed, no highlighting, never wrapped into a table)."""
    console.print(message, highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    """Print ``error: message`` and exit with code 2."""
    say(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@contextlib.contextmanager
def user_errors(on_interrupt: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """The one boundary between the caller's mistakes and bugs.

    A mistake on the command line (:class:`UserError`), a value tokencomp refuses
    (:class:`~tokencomp.errors.InputError`) or a file that cannot be read or written (``OSError``) is
    printed on one line with exit code 2. Every other exception is a bug and keeps its traceback.
    ``on_interrupt`` handles Ctrl-C and SIGTERM (what schedulers, ``timeout`` and ``docker stop`` send)
    alike; without one, they stop the command as usual.
    """
    previous = _term_as_interrupt() if on_interrupt is not None else None
    try:
        yield
    except (UserError, InputError, OSError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        on_interrupt()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _term_as_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt (in the main thread); returns the handler it replaced, or
    ``None`` where signals cannot be handled (another thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
