"""Matching dropped tokens to kept ones by cosine similarity, and averaging them in.

Similarities are computed one block of source rows at a time (:mod:`.blocks`), so a video of
thousands of tokens never holds its ``[S, T]`` similarity matrix, let alone the ``[S, T, D]``
broadcast a literal ``F.cosine_similarity(src[:, :, None], dst[:, None])`` builds.
"""

from __future__ import annotations

import torch

from .blocks import GEMM_MIN, compute_dtype, row_blocks, unit_vectors
from .gather import batched_gather, flat_index


# Target columns are padded with zeros to a multiple of this: MKL's float32 GEMM runs a slower tail
# kernel on a partial tile of columns (512 x 1024 by 54 columns takes 1.2x as long as by 64).
_COLUMN_TILE = 16


def _unit_columns(dst: torch.Tensor) -> torch.Tensor:
    """``[B, D, T']``: the ``dst`` rows scaled to unit length (zero rows stay zero), transposed.

    :func:`.blocks.unit_vectors`: ``F.normalize`` of the rows first scaled by a power of two: the same
    unit vectors, but the norm of a row of size ``1e30`` does not overflow nor that of size ``1e-30``
    underflow (to the ``1e-12`` floor). ``T' >= T`` is ``T`` rounded up to a multiple of
    :data:`_COLUMN_TILE` with zero columns when ``T >= GEMM_MIN`` (the products with the first ``T``
    columns are then the same, bit for bit: the GEMM computes every entry alike at those sizes), else
    ``T``; :func:`_best` looks at the first ``T`` only.
    """
    b, t, d = dst.shape
    padded = -(-t // _COLUMN_TILE) * _COLUMN_TILE if t >= GEMM_MIN else t
    unit = torch.zeros(b, padded, d, dtype=compute_dtype(dst.dtype), device=dst.device)
    unit_vectors(dst, unit.dtype, out=unit[:, :t])
    return unit.transpose(1, 2)


def _best(src: torch.Tensor, unit_dst: torch.Tensor, t: int) -> torch.Tensor:
    # cos(s, t) = (s . t/|t|) / |s|; the positive factor 1/|s| does not change the arg max over t, so
    # the source rows need no normalisation (a zero source row scores 0 everywhere and takes t = 0,
    # as it does with normalisation). max(dim) returns the first maximum, like argmax, and is faster
    # over a short last dimension.
    return torch.bmm(src, unit_dst)[:, :, :t].max(dim=-1).indices


def cosine_match(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar ``dst`` row for every ``src`` row (first maximum on ties).

    Parameters
    ----------
    src : torch.Tensor
        ``[B, S, D]``.
    dst : torch.Tensor
        ``[B, T, D]`` with ``T >= 1``.

    Returns
    -------
    torch.Tensor
        ``[B, S]`` int64 in ``[0, T)``.
    """
    unit = _unit_columns(dst)
    b, s, _ = src.shape
    out = torch.empty(b, s, dtype=torch.int64, device=src.device)
    for blk in row_blocks(b, s, max(src.shape[2], unit.shape[2])):
        out[:, blk] = _best(src[:, blk].to(unit.dtype), unit, dst.shape[1])
    return out


def mean_merge(dst: torch.Tensor, src: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Each ``dst`` row becomes the unweighted mean of itself and the ``src`` rows matched to it.

    ``(x + sum(matched)) / (1 + count)``; rows with no match stay as they are.

    Parameters
    ----------
    dst : torch.Tensor
        ``[B, T, D]``.
    src : torch.Tensor
        ``[B, S, D]``.
    match : torch.Tensor
        ``[B, S]`` index into ``T`` for each ``src`` row.
    """
    sums = dst.clone()
    _add_rows(sums, src.to(dst.dtype), match)
    return sums / _counts(match, dst)


def merge_rows(dst: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cosine_match` then :func:`mean_merge` of the rows ``x[b, rows[b]]`` into ``dst``.

    Fused, one block of source rows at a time: each block is gathered from ``x`` once, matched and
    added in, so neither the ``[B, S, D]`` source tokens nor the ``[B, S, T]`` similarities exist
    whole (``S`` is ~88 % of the tokens when 12.5 % are kept).

    Parameters
    ----------
    dst : torch.Tensor
        ``[B, T, D]`` merge targets (``T >= 1``) in the compute dtype of ``x``.
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.
    rows : torch.Tensor
        ``[B, S]`` int64 positions in ``x`` of the rows to merge.

    Returns
    -------
    tuple of torch.Tensor
        The merged ``[B, T, D]`` and the match ``[B, S]`` (index into ``T`` of each merged row).
    """
    unit = _unit_columns(dst)
    b, s = rows.shape
    t = dst.shape[1]
    sums = dst.clone()
    blocks = row_blocks(b, s, max(x.shape[2], unit.shape[2]))
    match = torch.empty(b, s, dtype=torch.int64, device=x.device) if len(blocks) != 1 else None
    for blk in blocks:
        src = batched_gather(x, rows[:, blk]).to(dst.dtype)
        best = _best(src, unit, t)
        if match is None:
            match = best
        else:
            match[:, blk] = best
        _add_rows(sums, src, best)
    return sums.div_(_counts(match, dst)), match


def _add_rows(sums: torch.Tensor, src: torch.Tensor, match: torch.Tensor) -> None:
    """``sums[b, match[b, i]] += src[b, i]`` in place, as whole-row ``index_add_`` on the flattened rows."""
    b, t, d = sums.shape
    sums.view(b * t, d).index_add_(0, flat_index(match, t), src.reshape(-1, d))


def _counts(match: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``[B, T, 1]``: one plus the number of sources matched to each ``dst`` row."""
    counts = torch.ones(dst.shape[:2], dtype=dst.dtype, device=dst.device)
    counts.scatter_add_(1, match, torch.ones(match.shape, dtype=dst.dtype, device=dst.device))
    return counts.unsqueeze(-1)
