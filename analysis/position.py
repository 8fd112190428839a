"""Positional bias: where kept tokens sit, and how much of that is position rather than content.

:func:`position_bias` shuffles each image's token contents over the positions (a permutation per image
and per repeat), compresses, and measures the 1-D Wasserstein distance between the kept positions
(normalised to ``(i + 0.5) / N``) and the uniform distribution over all positions. Content no longer
says anything about position, so a position-blind method keeps uniformly spread positions (distance
near 0, up to sampling noise), while a method that prefers some places (the end of the sequence, the
grid centre) keeps them whatever the content. :func:`kept_heatmap` is the plain mean of the kept masks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from scipy.stats import wasserstein_distance

from tokencomp.base import Compressor
from tokencomp.kernels import batched_gather
from tokencomp.types import Context


def kept_heatmap(indices: torch.Tensor, n: int, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Share of images keeping each position: ``[N]`` (or ``grid``-shaped) mean of the kept masks."""
    indices = indices if indices.dim() == 2 else indices[None]
    mask = torch.zeros(indices.shape[0], n, dtype=torch.float64, device=indices.device)
    mask.scatter_(1, indices, 1.0)
    heat = mask.mean(dim=0)
    return heat.view(*grid) if grid is not None else heat


def position_bias(
    compressor: Compressor,
    tokens: torch.Tensor,
    budget: int | float,
    context: Optional[Callable[[torch.Tensor, torch.Tensor], Context]] = None,
    repeats: int = 1,
    seed: int = 0,
) -> float:
    """1-D Wasserstein distance between kept positions under content shuffling and the uniform positions.

    Parameters
    ----------
    compressor : Compressor
        The strategy to measure.
    tokens : torch.Tensor
        ``[B, N, D]`` real tokens (their contents are shuffled, their statistics kept).
    budget : int or float
        As for :meth:`Compressor.compress`.
    context : callable, optional
        ``context(shuffled, perm)`` builds the context for the shuffled tokens ``shuffled[b, i] =
        tokens[b, perm[b, i]]`` (e.g. the grid and a [CLS] row permuted the same way).
    repeats : int
        Shuffles per image; the kept positions of all of them are pooled.
    seed : int
        Seed of the shuffles.

    Returns
    -------
    float
        In ``[0, 0.5)``: 0 for uniformly spread positions; ``(N - K) / (2N)`` for a method that always
        keeps the last ``K`` positions.
    """
    b, n, _ = tokens.shape
    g = torch.Generator().manual_seed(seed)
    kept = []
    for _ in range(repeats):
        perm = torch.rand(b, n, generator=g).argsort(dim=1).to(tokens.device)
        shuffled = batched_gather(tokens, perm)
        result = compressor.compress(shuffled, budget, context(shuffled, perm) if context is not None else None)
        kept.append(result.indices.flatten())
    return uniform_distance(torch.cat(kept), n)


def uniform_distance(indices: torch.Tensor, n: int) -> float:
    """1-D Wasserstein distance between kept positions ``indices`` (any shape, values in ``[0, n)``),
    normalised to ``(i + 0.5) / n``, and the uniform distribution over the ``n`` positions."""
    positions = (indices.flatten().double().cpu() + 0.5) / n
    uniform = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return float(wasserstein_distance(positions.numpy(), uniform.numpy()))
