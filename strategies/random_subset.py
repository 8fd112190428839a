"""``random``: a uniformly random subset of the tokens, the floor every method must beat."""

from __future__ import annotations

from typing import Optional

import torch

from tokencomp.base import Compressor
from tokencomp.kernels import selection_result
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context
from tokencomp.validation import SEED


@register("random")
class RandomSubset(Compressor):
    """Keep ``K`` tokens drawn uniformly without replacement; drop the rest unmerged.

    Parameters
    ----------
    seed : int or None, default 0
        Seed of the draw (each call with the same seed draws the same subset); ``None`` uses torch's
        global generator.
    """

    stage = "pre_llm"
    deterministic = False
    summary = "Uniformly random subset without replacement (reference)."
    complexity = "O(N log N + K D)"
    scale_invariant = True

    parameter_constraints = {"seed": SEED}

    def __init__(self, *, seed: Optional[int] = 0) -> None:
        self.seed = seed

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        b, n, _ = tokens.shape
        keys = torch.rand(b, n, generator=self._generator(context, tokens.device), device=tokens.device)
        indices = keys.argsort(dim=-1)[:, :k].sort(dim=-1).values
        return selection_result(tokens, indices)
