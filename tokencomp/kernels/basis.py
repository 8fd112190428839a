"""Choosing ``M`` basis tokens out of ``N``: farthest-point sampling, greedy QR pivoting, random.

Both greedy selections loop only over their ``M`` steps; each step is a bounded number of batched
passes over the tokens (no host synchronisation, so the same code runs on GPU).
"""

from __future__ import annotations

from typing import Optional

import torch

from .blocks import compute_dtype, row_blocks, rows_matmul, token_scale


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


def qr_pivot_indices(x: torch.Tensor, m: int) -> torch.Tensor:
    """First ``m`` pivots of QR with column pivoting on ``x^T`` (the tokens are the columns).

    Greedy: take the token of largest residual norm, project it out of all tokens, repeat; see
    :func:`qr_pivots`, which also returns the Gram rows it computed on the way.

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
    return qr_pivots(x, m)[0]


def qr_pivots(x: torch.Tensor, m: int, *, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivots of greedy QR with column pivoting on ``x^T``, and the Gram rows ``x_p . x`` of the pivots.

    Run as a pivoted Cholesky factorisation of the Gram matrix ``x x^T`` that never forms it: step
    ``j`` needs one Gram row ``x_p . x`` (a matrix-vector product, one pass over the tokens) and the
    ``j`` previous rows of the factor; the residual squared norms are downdated, ``r_i^2 -= L_ji^2``,
    rather than recomputed. The cost is ``O(m N D)`` with ``O(m N)`` extra memory, and the pivots
    equal LAPACK's ``geqp3`` (``scipy.linalg.qr(x.T, pivoting=True)``) on inputs without ties. The
    Gram rows are returned because they are exactly ``S X^T`` for the basis ``S = x[pivots]``, the
    right-hand side of ApET's least-squares solve.

    Once the tokens' rank is exhausted the remaining residuals are zero up to rounding; a pivot whose
    residual is below ``N * eps`` times the largest token norm is scaled by that floor instead, so the
    factor stays finite and tiny (the later pivots are then arbitrary, as they are for LAPACK).

    The factorisation runs on the tokens scaled by a power of two per batch row, ``f = token_scale(x)``:
    the same pivots (bit for bit on tokens of ordinary size), without the overflow of squared norms and
    products of tokens of size ``1e30`` or their underflow at ``1e-30``. The squared norms are taken of
    row blocks of the scaled tokens; the Gram rows are ``x . (f^2 x_p)``, so ``x`` is never copied whole.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.
    m : int
        Number of pivots.
    scaled : bool, default False
        Return the Gram rows times ``f^2``, the units :func:`~tokencomp.kernels.ridge_coefficients`
        takes them in (they are finite even where ``x_p . x`` overflows).

    Returns
    -------
    tuple of torch.Tensor
        ``[B, m]`` int64 pivots in pivot order, and ``[B, m, N]`` Gram rows in the compute dtype.
    """
    b, n, d = x.shape
    ct = compute_dtype(x.dtype)
    f = token_scale(x)  # [B, 1, 1]
    norms = torch.empty(b, n, dtype=ct, device=x.device)  # squared norms of the scaled tokens
    for blk in row_blocks(b, n, d):
        norms[:, blk] = torch.linalg.vector_norm(x[:, blk].to(ct) * f, dim=-1).square_()
    # residuals below this are rounding (tiny > 0 keeps all-zero tokens finite)
    floor = (norms.amax(dim=-1, keepdim=True) * (n * torch.finfo(ct).eps)).clamp_min_(torch.finfo(ct).tiny)
    factor = torch.zeros(b, n, m, dtype=ct, device=x.device)  # the Cholesky factor L, zero-padded
    picked, gram = [], []
    for j in range(m):
        p = norms.argmax(dim=-1, keepdim=True)  # [B, 1]
        picked.append(p)
        pivot = torch.gather(x, 1, p.unsqueeze(-1).expand(b, 1, d)).to(ct) * f * f  # [B, 1, D] (f^2 may overflow)
        g = rows_matmul(x, pivot.transpose(1, 2))  # [B, N, 1] = f^2 x . x_p, one pass over the tokens
        gram.append(g)
        # L_j = (g - L L_p^T) / sqrt(r_p^2); the columns of L after j - 1 are still zero
        lp = torch.gather(factor, 1, p.unsqueeze(-1).expand(b, 1, m))  # [B, 1, m]
        col = torch.baddbmm(g, factor, lp.transpose(1, 2), alpha=-1)[:, :, 0]  # [B, N]
        # a residual below the floor is rounding: dividing by the floor keeps L finite and tiny there
        col.mul_(norms.gather(1, p).clamp_min_(floor).rsqrt_())
        factor[:, :, j] = col
        norms.addcmul_(col, col, value=-1.0)
        norms.scatter_(1, p, -1.0)  # a pivot is never chosen again
    gram_rows = torch.cat(gram, dim=2).transpose(1, 2)
    return torch.cat(picked, dim=1), (gram_rows if scaled else gram_rows / f / f)


def random_indices(
    b: int, n: int, m: int, *, generator: Optional[torch.Generator], device: torch.device
) -> torch.Tensor:
    """``[B, m]`` indices drawn uniformly from ``[0, n)`` with replacement (the ApET authors' ``random``)."""
    return torch.randint(n, (b, m), generator=generator, device=device)
