"""Batched gathers and the result of a pure selection."""

from __future__ import annotations

import torch

from ..types import CompressionResult


def batched_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Return ``x[b, idx[b]]`` for every row: ``x`` ``[B, N, D]``, ``idx`` ``[B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def slots_of(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Map each of ``n`` positions to its output slot in ``indices`` ``[B, K]``, ``-1`` when absent."""
    b, k = indices.shape
    slots = torch.full((b, n), -1, dtype=torch.int64, device=indices.device)
    ar = torch.arange(k, device=indices.device).expand(b, k)
    return slots.scatter_(1, indices, ar)


def selection_result(tokens: torch.Tensor, indices: torch.Tensor, **info: torch.Tensor) -> CompressionResult:
    """Result of keeping the tokens at ``indices`` unchanged and dropping the rest.

    Parameters
    ----------
    tokens : torch.Tensor
        ``[B, N, D]`` input tokens.
    indices : torch.Tensor
        ``[B, K]`` positions kept, ascending.
    **info
        Extra tensors for :attr:`CompressionResult.info`.
    """
    indices = indices.to(torch.int64)
    return CompressionResult(
        tokens=batched_gather(tokens, indices),
        indices=indices,
        assignment=slots_of(indices, tokens.shape[1]),
        info=dict(info),
    )
