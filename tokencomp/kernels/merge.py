"""Matching dropped tokens to kept ones by cosine similarity, and averaging them in.

Similarities are computed one block of source rows at a time (:mod:`.blocks`), so a video of
thousands of tokens never holds its ``[S, T]`` similarity matrix, let alone the ``[S, T, D]``
broadcast a literal ``F.cosine_similarity(src[:, :, None], dst[:, None])`` builds.
"""

from __future__ import annotations

from typing import Optional

import torch

from .blocks import compute_dtype, row_blocks, unit_vectors
from .gather import batched_gather, flat_index


def _unit_columns(dst: torch.Tensor, norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, D, T]``: the ``dst`` rows scaled to unit length (zero rows stay zero), transposed.

    :func:`.blocks.unit_vectors`: ``F.normalize`` of the rows first scaled by a power of two: the same
    unit vectors, but the norm of a row of size ``1e30`` does not overflow nor that of size ``1e-30``
    underflow (to the ``1e-12`` floor). With ``norms`` ``[B, T]`` given, the rows divided by them.
    """
    if norms is None:
        return unit_vectors(dst, compute_dtype(dst.dtype)).transpose(1, 2)
    return torch.div(dst, norms.unsqueeze(-1).clamp_min(1e-12)).transpose(1, 2)


def _best(src: torch.Tensor, unit_dst: torch.Tensor) -> torch.Tensor:
    # cos(s, t) = (s . t/|t|) / |s|; the positive factor 1/|s| does not change the arg max over t, so
    # the source rows need no normalisation (a zero source row scores 0 everywhere and takes t = 0,
    # as it does with normalisation). max(dim) returns the first maximum, like argmax, and is faster
    # over a short last dimension.
    return torch.bmm(src, unit_dst).max(dim=-1).indices


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
        out[:, blk] = _best(src[:, blk].to(unit.dtype), unit)
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


def merge_rows(
    dst: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, dst_norms: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cosine_match` then :func:`mean_merge` of the rows ``x[b, rows[b]]`` into ``dst``.

    Fused, one block of token rows at a time, so neither the ``[B, S, D]`` source tokens nor the
    ``[B, S, T]`` similarities exist whole. Each target's sum adds its rows in ascending position
    order, whatever the order of ``rows``. When the rows to merge are at least half of the tokens
    (``S`` is ~88 % of them when 12.5 % are kept), every token row is matched and added in place, the
    others to a discarded extra target, rather than copied out first: one pass over the tokens fewer
    for 1 / 0.88 = 1.14 times the matching product. Otherwise the rows are gathered block by block.

    Parameters
    ----------
    dst : torch.Tensor
        ``[B, T, D]`` merge targets (``T >= 1``) in the compute dtype of ``x``.
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.
    rows : torch.Tensor
        ``[B, S]`` int64 distinct positions in ``x`` of the rows to merge.
    dst_norms : torch.Tensor, optional
        ``[B, T]`` Euclidean norms of the ``dst`` rows, when the caller has them (for rows whose squares
        neither overflow nor underflow, e.g. tokens scaled by :func:`~tokencomp.kernels.token_scale`):
        the unit vectors are then ``dst / dst_norms`` rather than computed here.

    Returns
    -------
    tuple of torch.Tensor
        The merged ``[B, T, D]`` and the match ``[B, S]`` (index into ``T`` of each merged row).
    """
    unit = _unit_columns(dst, dst_norms)
    b, n, d = x.shape
    t = dst.shape[1]
    sums = torch.empty(b, t + 1, d, dtype=dst.dtype, device=dst.device)  # target t: the discarded rows
    sums[:, :t] = dst
    blocks = row_blocks(b, n, max(d, t))
    if 2 * rows.shape[1] >= n:  # match every row; those not in rows go to target t
        merged = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, rows, True)
        best = torch.empty(b, n, dtype=torch.int64, device=x.device)
        for blk in blocks:
            src = x[:, blk].to(dst.dtype)
            best[:, blk] = torch.where(merged[:, blk], _best(src, unit), t)
            _add_rows(sums, src, best[:, blk])
        match = best.gather(1, rows)
    else:  # gather the rows in ascending position
        ordered, perm = rows.sort(dim=1)
        best = torch.empty(rows.shape, dtype=torch.int64, device=x.device)
        for blk in row_blocks(b, rows.shape[1], max(d, t)):
            src = batched_gather(x, ordered[:, blk]).to(dst.dtype)
            best[:, blk] = _best(src, unit)
            _add_rows(sums, src, best[:, blk])
        match = torch.empty_like(best).scatter_(1, perm, best)
    return sums[:, :t].div_(_counts(match, dst)), match


def _add_rows(sums: torch.Tensor, src: torch.Tensor, match: torch.Tensor) -> None:
    """``sums[b, match[b, i]] += src[b, i]`` in place, as whole-row ``index_add_`` on the flattened rows."""
    b, t, d = sums.shape
    sums.view(b * t, d).index_add_(0, flat_index(match, t), src.reshape(-1, d))


def _counts(match: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``[B, T, 1]``: one plus the number of sources matched to each ``dst`` row."""
    counts = torch.ones(dst.shape[:2], dtype=dst.dtype, device=dst.device)
    counts.scatter_add_(1, match, torch.ones(match.shape, dtype=dst.dtype, device=dst.device))
    return counts.unsqueeze(-1)
