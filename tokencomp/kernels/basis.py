"""Choosing ``M`` basis tokens out of ``N``: farthest-point sampling, greedy QR pivoting, random."""

from __future__ import annotations

from typing import Optional

import torch


def fps_indices(x: torch.Tensor, m: int, start: torch.Tensor) -> torch.Tensor:
    """Farthest-point sampling with squared L2 distance, as the ApET authors run it.

    Starting at ``start``, repeat ``m`` times: append the current index, lower every token's distance
    to the set so far with its squared distance to the current token, and move to the token of largest
    distance (the first one on ties).

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens (float32 recommended).
    m : int
        Number of indices.
    start : torch.Tensor
        ``[B]`` int64 start index per row.

    Returns
    -------
    torch.Tensor
        ``[B, m]`` int64 indices in selection order.
    """
    b, n, _ = x.shape
    dist = torch.full((b, n), float("inf"), dtype=x.dtype, device=x.device)
    cur = start.to(torch.int64)
    picked = []
    rows = torch.arange(b, device=x.device)
    for _ in range(m):
        picked.append(cur)
        centre = x[rows, cur].unsqueeze(1)  # [B, 1, D]
        dist = torch.minimum(dist, (x - centre).pow(2).sum(-1))
        cur = dist.argmax(dim=-1)  # first maximum
    return torch.stack(picked, dim=1)


def qr_pivot_indices(x: torch.Tensor, m: int) -> torch.Tensor:
    """First ``m`` pivots of QR with column pivoting on ``x^T`` (the tokens are the columns).

    Greedy: take the token of largest residual norm, project it out of all tokens, repeat. The
    residual norms are downdated (``r_i^2 -= (q . x_i)^2``) rather than recomputed, and the new basis
    vector is orthogonalised twice against the previous ones, so the cost is ``O(m N D)`` and the
    pivots equal LAPACK's ``geqp3`` (``scipy.linalg.qr(x.T, pivoting=True)``) on inputs without ties.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens (float32 or float64).
    m : int
        Number of pivots.

    Returns
    -------
    torch.Tensor
        ``[B, m]`` int64 pivot indices in pivot order.
    """
    b, n, d = x.shape
    rows = torch.arange(b, device=x.device)
    norms = x.pow(2).sum(-1)  # residual squared norms [B, N]
    q = x.new_zeros(b, m, d)
    picked = []
    for j in range(m):
        p = norms.argmax(dim=-1)
        picked.append(p)
        v = x[rows, p]  # [B, D]
        for _ in range(2):  # classical Gram-Schmidt, twice is enough
            v = v - torch.einsum("bj,bjd->bd", torch.einsum("bjd,bd->bj", q[:, :j], v), q[:, :j])
        vn = v.norm(dim=-1, keepdim=True)
        v = torch.where(vn > 0, v / vn.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(v))
        q[:, j] = v
        coef = torch.einsum("bnd,bd->bn", x, v)
        norms = (norms - coef.pow(2)).clamp_min(0)
        norms[rows, p] = -1.0  # a pivot is never chosen again
    return torch.stack(picked, dim=1)


def random_indices(
    b: int, n: int, m: int, *, generator: Optional[torch.Generator], device: torch.device
) -> torch.Tensor:
    """``[B, m]`` indices drawn uniformly from ``[0, n)`` with replacement (the ApET authors' ``random``)."""
    return torch.randint(n, (b, m), generator=generator, device=device)
