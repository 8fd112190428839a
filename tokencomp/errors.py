"""The exception types tokencomp raises on purpose.

A mistake of the caller's (a bad parameter, budget, tensor or context field, a file that cannot be
read) raises :class:`InputError` or a subclass, with a message that says what was given, what is
allowed and how to fix it. The command line reports these on one line; every other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "AttentionUnavailableError",
    "InputError",
    "InvalidParameterError",
    "UnknownStrategyError",
    "WeightsUnavailableError",
]


class InputError(ValueError):
    """An input the caller gave is not allowed: the message names it, the allowed values and the fix."""


class InvalidParameterError(InputError):
    """A strategy parameter or an argument has a value that is not allowed."""


class UnknownStrategyError(InputError, KeyError):
    """No strategy is registered under the name given; the message lists close matches and all names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(InputError):
    """Pretrained weights a command needs cannot be obtained (no network, a checksum that differs).

    The message names the files, why they are missing and the exact command that fetches them by hand;
    everything of tokencomp that does not need them keeps working.
    """


class AttentionUnavailableError(RuntimeError):
    """A strategy reads attention weights that the running attention kernel does not return.

    Raised inside a model hooked by :func:`tokencomp.apply` when a ``needs_attention`` strategy meets
    SDPA / FlashAttention without ``allow_eager_fallback``; the FlashAttention analysis records exactly
    this error as "needs eager attention".
    """
