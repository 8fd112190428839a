"""Batched gathers and the result of a pure selection."""

from __future__ import annotations

import torch

from ..types import CompressionResult


def flat_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """``[B * K]`` positions of ``idx`` ``[B, K]`` (into ``n`` rows per batch row) in the flattened ``[B * n]``."""
    if idx.shape[0] == 1:
        return idx.view(-1) if idx.is_contiguous() else idx.reshape(-1)
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n
    return (idx + offsets).reshape(-1)


def batched_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Return ``x[b, idx[b]]`` for every row: ``x`` ``[B, N, D]``, ``idx`` ``[B, K]`` -> ``[B, K, D]``.

    Whole rows are copied with ``index_select`` on the flattened tokens, several times faster than
    ``torch.gather`` with an index expanded over ``D`` (which reads one index per element).
    """
    b, n, d = x.shape
    if not x.is_contiguous():  # flattening would copy all of x
        return x[torch.arange(b, device=x.device).unsqueeze(1), idx]
    return x.view(b * n, d).index_select(0, flat_index(idx, n)).view(b, idx.shape[1], d)


def put_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Set ``x[b, idx[b]] = rows[b]`` in place and return ``x``: ``x`` ``[B, N, D]`` contiguous, ``idx`` ``[B, K]``
    distinct per row, ``rows`` ``[B, K, D]``.

    One ``index_copy_`` on the flattened rows, rather than advanced indexing's broadcast index tensors.
    """
    b, n, d = x.shape
    x.view(b * n, d).index_copy_(0, flat_index(idx, n), rows.reshape(-1, d))
    return x


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
