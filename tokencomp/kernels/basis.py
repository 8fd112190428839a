"""Choosing ``M`` basis tokens out of ``N``: farthest-point sampling, greedy QR pivoting, random.

Both greedy selections loop only over their ``M`` steps; each step is a bounded number of batched
passes over the tokens (no host synchronisation, so the same code runs on GPU).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from tokencomp.errors import InputError

from .blocks import compute_dtype, row_blocks, token_scale
from .matvec import padded_rows, token_dots_step


def fps_indices(x: torch.Tensor, m: int, start: torch.Tensor) -> torch.Tensor:
    """Farthest-point sampling with squared L2 distance, as the ApET authors run it.

    Starting at ``start``, repeat ``m`` times: append the current index, lower every token's distance
    to the set so far with its squared distance to the current token, and move to the token of largest
    distance (the first one on ties).

    The squared distances are computed exactly as the authors do, ``((x - c) ** 2).sum(-1)`` in
    float32 (float64 for float64 tokens), not by the faster ``|x|^2 - 2 x.c + |c|^2`` expansion whose
    cancellation would reorder near ties and turn the zero distance of duplicate tokens into noise.
    The difference is formed in row blocks held in one reused buffer, so a step costs one pass over
    the tokens and the extra memory is one block, whatever ``N``. It is formed on the tokens scaled by
    a power of two per batch row (:func:`~tokencomp.kernels.blocks.token_scale`), which scales every
    distance alike (so the picks are the same, bit for bit on tokens of ordinary size) but keeps the
    squares of tokens of size ``1e30`` from overflowing and of size ``1e-30`` from vanishing.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.
    m : int
        Number of indices.
    start : torch.Tensor
        ``[B]`` int64 start index per row.

    Returns
    -------
    torch.Tensor
        ``[B, m]`` int64 indices in selection order.
    """
    b, n, d = x.shape
    ct = compute_dtype(x.dtype)
    blocks = row_blocks(b, n, d)
    buf = torch.empty(b, blocks[0].stop, d, dtype=ct, device=x.device)
    dist = torch.full((b, n), float("inf"), dtype=ct, device=x.device)
    rows = torch.arange(b, device=x.device)
    picked = torch.empty(b, m, dtype=torch.int64, device=x.device)
    cur = start.to(torch.int64)
    f = token_scale(x)  # [B, 1, 1]
    for j in range(m):
        picked[:, j] = cur
        neg_centre = x[rows, cur].to(ct).unsqueeze(1) * -f  # [B, 1, D]
        for blk in blocks:
            diff = buf[:, : blk.stop - blk.start]
            torch.addcmul(neg_centre, x[:, blk], f, out=diff)  # x f - c f = (x - c) f, one rounding
            dist[:, blk] = torch.minimum(dist[:, blk], diff.square_().sum(-1))
        cur = dist.argmax(dim=-1)  # first maximum
    return picked


class PivotedQR(NamedTuple):
    """The first ``M`` steps of QR with column pivoting on ``x^T``, as :func:`qr_pivots` returns them.

    All quantities are of the tokens scaled by ``scale`` (a power of two per batch row,
    :func:`~tokencomp.kernels.blocks.token_scale`): with ``Q`` the orthonormal basis of the pivots'
    span, ``x_i * scale = factor[i] Q + rho_i`` with ``rho_i`` orthogonal to it.

    The fields:

    ``pivots``
        ``[B, M]`` int64 pivot positions in pivot order.
    ``factor``
        ``[B, N, M]``: the first ``M`` columns of the Cholesky factor ``L`` of the Gram matrix of the
        scaled tokens (``factor[b, pivots[b]]`` is lower triangular). A view of an ``[B, M, N']`` tensor.
    ``residual``
        ``[B, N]`` squared norms ``|rho_i|^2`` of what the pivots leave unexplained, downdated (``0``
        at the pivots, never below 0).
    ``norms``
        ``[B, N]`` squared norms of the scaled tokens.
    ``scale``
        ``[B, 1, 1]`` the power of two the tokens were scaled by.
    ``tokens``
        ``[B, N', D]`` contiguous, the tokens the pivoting read, ``x * tokens_scale`` in the compute
        dtype, then ``N' - N`` zero rows (:func:`~tokencomp.kernels.matvec.padded_rows`): a caller may
        read them again (while they are still in cache) rather than ``x``.
    ``tokens_scale``
        ``[B, 1, 1]``: ``scale`` when ``tokens`` is a scaled copy, 1 when it is ``x`` itself.
    """

    pivots: torch.Tensor
    factor: torch.Tensor
    residual: torch.Tensor
    norms: torch.Tensor
    scale: torch.Tensor
    tokens: torch.Tensor
    tokens_scale: torch.Tensor


def qr_pivot_indices(x: torch.Tensor, m: int) -> torch.Tensor:
    """First ``m`` pivots of QR with column pivoting on ``x^T`` (the tokens are the columns).

    Greedy: take the token of largest residual norm, project it out of all tokens, repeat; see
    :func:`qr_pivots`, which also returns the factor and the residual norms it computed on the way.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype (the maths run in float32, float64 for float64 tokens).
    m : int
        Number of pivots.

    Returns
    -------
    torch.Tensor
        ``[B, m]`` int64 pivot indices in pivot order.
    """
    return qr_pivots(x, m).pivots


def qr_pivots(
    x: torch.Tensor, m: int, scale: Optional[torch.Tensor] = None, norms: Optional[torch.Tensor] = None
) -> PivotedQR:
    """Greedy QR with column pivoting on ``x^T`` for ``m`` steps, with residual norms downdated.

    Run as a pivoted Cholesky factorisation of the Gram matrix ``x x^T`` that never forms it. Step
    ``j`` takes the token ``p`` of largest residual squared norm ``r_p^2``, computes the factor's
    column ``L_j = (x . x_p - L L_p^T) / r_p`` (one matrix-vector product, one pass over the tokens,
    and a product with the ``j`` columns of ``L`` so far) and downdates every residual,
    ``r_i^2 -= L_ji^2``, rather than recomputing it. The cost is ``O(m N D)``; the pivots equal
    LAPACK's ``geqp3`` (``scipy.linalg.qr(x.T, pivoting=True)``) on inputs without ties.

    The tokens are copied once, scaled by ``f = token_scale(x)`` (a power of two per batch row: the
    same pivots, bit for bit on tokens of ordinary size, without the overflow of squared norms of
    tokens of size ``1e30`` or their underflow at ``1e-30``), into a contiguous ``[B, N', D]`` buffer
    in the compute dtype (returned as ``tokens``); ``L`` is kept as ``[B, m, N']`` rows. The extra
    memory is that buffer: the tokens' size in float32 (twice the size of half-precision tokens).
    Given ``scale`` and ``norms``, float32 tokens that are contiguous and need no padding rows
    (``N = padded_rows(N)``: 576, 18,432) are not copied: the steps run on the tokens as they are and
    the factor and residuals are scaled at the end, the same values as those of ``x f`` (powers of
    two: exact while nothing overflows or underflows, which ``scale`` from
    :func:`~tokencomp.kernels.blocks.norm_scale` guarantees for the squared norms).

    Once the tokens' rank is exhausted the remaining residuals are zero up to rounding; a pivot whose
    residual is below ``N * eps`` times the largest squared norm is divided by that floor instead, so
    the factor stays finite and tiny (the later pivots are then arbitrary, as they are for LAPACK). A
    pivot is never chosen twice.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.
    m : int
        Number of pivots (at most ``N``).
    scale, norms : torch.Tensor, optional
        A power of two ``[B, 1, 1]`` to scale the tokens by instead of :func:`token_scale` (one under
        which no squared norm overflows), and ``[B, N]`` the squared norms of the scaled tokens, when
        the caller has them (:func:`~tokencomp.kernels.blocks.norm_scale`): both or neither.

    Returns
    -------
    PivotedQR
        Pivots, factor, residual and squared norms, all of the scaled tokens, the scale, and the tokens
        the steps read with their scale.
    """
    b, n, d = x.shape
    ct = compute_dtype(x.dtype)
    if (scale is None) != (norms is None):
        raise InputError("qr_pivots: give both scale and norms (from norm_scale), or neither.")
    f = token_scale(x) if scale is None else scale  # [B, 1, 1]
    width = padded_rows(n)
    # given the scale, float32 tokens needing no padding rows are read in place and the steps run on the
    # tokens as they are (the scale keeps their squares in range); the results are scaled at the end
    in_place = scale is not None and width == n and x.dtype == ct and x.is_contiguous()
    if in_place:
        buf = x
    else:
        buf = torch.empty(b, width, d, dtype=ct, device=x.device)  # x f, then zero rows
        for blk in row_blocks(b, n, d):
            torch.mul(x[:, blk], f, out=buf[:, blk])
        buf[:, n:] = 0
    if norms is None:
        norms = torch.linalg.vector_norm(buf[:, :n], dim=-1).square_()
    squared = norms / (f * f).view(b, 1) if in_place else norms  # of the tokens the steps read
    factor = torch.zeros(b, m, width, dtype=ct, device=x.device)  # L^T
    residual = torch.full((b, width), -1.0, dtype=ct, device=x.device)  # padding rows: never pivots
    residual[:, :n] = squared
    # residuals below this are rounding (tiny > 0 keeps all-zero tokens finite)
    batched = b > 1  # one batch row: 1-D pivot indices, no offsets
    floor = (squared.amax(dim=-1, keepdim=batched) * (n * torch.finfo(ct).eps)).clamp_min_(torch.finfo(ct).tiny)
    offsets = torch.arange(0, b * width, width, device=x.device).unsqueeze(1)
    rows = buf.view(b * width, d)
    flat_residual = residual.view(-1)
    col = torch.empty(b, width, dtype=ct, device=x.device)
    pivot = torch.empty(b, d, dtype=ct, device=x.device)
    dots = token_dots_step(buf, pivot, col)  # col = buf . pivot, per row
    col_t, factor_t = col.unsqueeze(2), factor.transpose(1, 2)  # [B, N', 1], [B, N', M]
    columns = factor.unbind(1)  # L_j, [B, N'] each
    index = torch.empty(b, m, 1, dtype=torch.int64, device=x.device) if batched else None  # p, for the gather
    picked = []
    for j in range(m):
        top, p = residual.max(dim=-1, keepdim=batched)  # r_p^2 and p, [B] or [B, 1]
        picked.append(p)
        flat = (p + offsets).view(-1) if batched else p
        torch.index_select(rows, 0, flat, out=pivot)  # x_p f (in place: x_p)
        dots()  # x f . x_p f (x . x_p)
        # - L L_p^T over all m columns of L (those after j are still zero)
        lp = factor.gather(2, index.copy_(p.unsqueeze(1))) if index is not None else factor.index_select(2, p)
        col_t.baddbmm_(factor_t, lp, alpha=-1.0)
        # L_j = that / r_p (a residual below the floor is rounding: dividing by the floor keeps L tiny)
        lj = torch.mul(col, top.clamp_min_(floor).rsqrt_(), out=columns[j])
        residual.addcmul_(lj, lj, value=-1.0)
        flat_residual.index_fill_(0, flat, -1.0)  # a pivot is never chosen again
    if in_place:  # the factorisation of x f: L f, r^2 f^2 (powers of two: exact)
        factor.mul_(f)
        residual.mul_((f * f).view(b, 1))
    return PivotedQR(
        torch.cat(picked, dim=-1).view(b, m),
        factor[:, :, :n].transpose(1, 2),
        residual[:, :n].clamp_min_(0.0),
        norms,
        f,
        buf,
        torch.ones_like(f) if in_place else f,
    )


def random_indices(
    b: int, n: int, m: int, *, generator: Optional[torch.Generator], device: torch.device
) -> torch.Tensor:
    """``[B, m]`` indices drawn uniformly from ``[0, n)`` with replacement (the ApET authors' ``random``)."""
    return torch.randint(n, (b, m), generator=generator, device=device)
