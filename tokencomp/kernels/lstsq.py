"""Ridge least-squares reconstruction of tokens from a few basis tokens, and its error norms."""

from __future__ import annotations

from typing import Optional

import torch

from .blocks import compute_dtype, row_blocks, rows_matmul

ERROR_NORMS = ("l2", "l1", "linf", "relative")


def ridge_coefficients(
    x: torch.Tensor, s: torch.Tensor, ridge: float, rhs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Coefficients ``C^T = solve(S S^T + ridge I, S X^T)`` of every token on the basis, ``[B, M, N]``.

    The ``M x M`` system is formed and solved in float64: with repeated basis tokens (random
    sampling with replacement, or FPS on rank-deficient tokens) and token norms above ~100, a small
    ridge vanishes in float32 (``1e4 + 1e-5 == 1e4``) and ``G`` is singular there. In float64 the
    ridge solution is well defined; ``S X^T`` (size ``M N``) is formed in the compute dtype
    (float32, or float64 for float64 tokens) and the result is returned in it.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.
    s : torch.Tensor
        ``[B, M, D]`` basis tokens in the compute dtype of ``x``.
    ridge : float
        Ridge added to the diagonal of the Gram matrix.
    rhs : torch.Tensor, optional
        ``S X^T`` ``[B, M, N]`` when the caller already has it (the QR basis computes it on the way).
    """
    m = s.shape[1]
    s64 = s.double()
    gram = s64 @ s64.transpose(1, 2) + ridge * torch.eye(m, dtype=torch.float64, device=s.device)
    if rhs is None:
        rhs = rows_matmul(x, s.transpose(1, 2)).transpose(1, 2)  # [B, M, N]
    return torch.linalg.solve(gram, rhs.double()).to(compute_dtype(x.dtype))


def ridge_residual(x: torch.Tensor, s: torch.Tensor, ridge: float) -> torch.Tensor:
    """Residual ``X - C S`` of rebuilding every token from the basis rows by ridge regression.

    ``[B, N, D]`` in the compute dtype; :func:`ridge_errors` gives its row norms without forming it.
    See :func:`ridge_coefficients` for the solve.
    """
    coef = ridge_coefficients(x, s, ridge)
    return torch.baddbmm(x.to(coef.dtype), coef.transpose(1, 2), s, alpha=-1)


def ridge_errors(
    x: torch.Tensor, s: torch.Tensor, ridge: float, norm: str, rhs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-token error ``[B, N]`` of the ridge reconstruction under ``norm``, in row blocks.

    Equal to ``residual_errors(ridge_residual(x, s, ridge), x, norm)``, but the residual is formed
    one row block at a time, so the extra memory is one block rather than the tokens' size. ``rhs``
    is as for :func:`ridge_coefficients`.
    """
    coef = ridge_coefficients(x, s, ridge, rhs).transpose(1, 2)  # [B, N, M]
    b, n, d = x.shape
    out = torch.empty(b, n, dtype=coef.dtype, device=x.device)
    for blk in row_blocks(b, n, d):
        rows = x[:, blk].to(coef.dtype)
        out[:, blk] = residual_errors(torch.baddbmm(rows, coef[:, blk], s, alpha=-1), rows, norm)
    return out


def residual_errors(residual: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-token error ``[B, N]`` of a residual ``[B, N, D]`` under ``norm``.

    ``l2``: Euclidean norm of the residual row (the authors' choice); ``l1``: sum of absolute values;
    ``linf``: largest absolute value; ``relative``: ``l2`` divided by the token's own L2 norm (0 for a
    zero token, which any basis rebuilds exactly).
    """
    if norm == "l2":
        return residual.norm(dim=-1)
    if norm == "l1":
        return residual.abs().sum(dim=-1)
    if norm == "linf":
        return residual.abs().amax(dim=-1)
    if norm == "relative":
        own = x.norm(dim=-1)
        err = residual.norm(dim=-1)
        return torch.where(own > 0, err / torch.where(own > 0, own, torch.ones_like(own)), torch.zeros_like(err))
    raise ValueError(f"unknown error norm {norm!r}; allowed: {', '.join(ERROR_NORMS)}")
