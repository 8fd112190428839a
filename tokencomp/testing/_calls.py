"""How the checks call a compressor: the budgets it accepts, fresh instances, pinned random numbers."""

from __future__ import annotations

from typing import Optional

import torch

from ..base import Compressor
from ..kernels.gather import batched_gather
from ..types import CompressionResult, Context
from ._data import N, make_context, make_tokens

__all__ = ["valid_budgets"]


def accepts(compressor: Compressor, k: int, n: int, context: Context) -> bool:
    """Whether ``compressor``'s budget check lets it keep ``k`` of ``n`` tokens with ``context``."""
    try:
        compressor._check_budget(k, n, context)
    except ValueError:
        return False
    return True


def valid_budgets(compressor: Compressor, n: int, context: Context) -> list[int]:
    """All ``K`` in ``[1, n]`` that ``compressor`` accepts, as declared by its ``_check_budget``."""
    return [k for k in range(1, n + 1) if accepts(compressor, k, n, context)]


def some_budgets(compressor: Compressor) -> list[int]:
    """The smallest, a middle and the largest budget ``compressor`` accepts on :func:`make_tokens`."""
    x = make_tokens()
    budgets = valid_budgets(compressor, N, make_context(compressor, x))
    assert budgets, f"{compressor!r} accepts no budget at all for N={N}"
    picks = {budgets[0], budgets[len(budgets) // 2], budgets[-1]}
    return sorted(picks)


def pinned(compressor: Compressor, context: Context) -> Context:
    """``context`` with a fresh ``generator`` seeded with 0 when ``compressor`` is randomised and unseeded
    (``seed=None``), so that every call so pinned draws the same random numbers; else ``context``."""
    if compressor.deterministic or getattr(compressor, "seed", None) is not None or context.generator is not None:
        return context
    return context.replace(generator=torch.Generator().manual_seed(0))


def fresh(compressor: Compressor) -> Compressor:
    """A new instance with ``compressor``'s parameters."""
    return type(compressor)(**compressor.get_params())


def run(compressor: Compressor, tokens: torch.Tensor, budget, context: Optional[Context] = None) -> CompressionResult:
    """``compressor.compress`` with :func:`make_context` (by default) and pinned random numbers."""
    if context is None:
        context = make_context(compressor, tokens if tokens.dim() == 3 else tokens.unsqueeze(0))
    return compressor.compress(tokens, budget, pinned(compressor, context))


def is_selection(compressor: Compressor, k: int) -> bool:
    """Whether at budget ``k`` the strategy returns input tokens unchanged (``tokens == x[indices]``) on
    :func:`make_tokens`: the strategies (and budgets) held to it on degenerate tokens too."""
    x = make_tokens()
    result = compressor.compress(x, k, make_context(compressor, x))
    return torch.equal(result.tokens, batched_gather(x, result.indices))
