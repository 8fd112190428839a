"""Ridge least-squares reconstruction of tokens from a few basis tokens, and its error norms."""

from __future__ import annotations

import torch

ERROR_NORMS = ("l2", "l1", "linf", "relative")


def ridge_residual(x: torch.Tensor, s: torch.Tensor, ridge: float) -> torch.Tensor:
    """Residual of rebuilding every token from the basis rows by ridge regression.

    ``G = S S^T + ridge * I``, ``C = solve(G, S X^T)^T``, ``X_hat = C S``; returns ``X - X_hat``.

    The ``M x M`` system is formed and solved in float64: with repeated basis tokens (random
    sampling with replacement, or FPS on rank-deficient tokens) and token norms above ~100, a small
    ridge vanishes in float32 (``1e4 + 1e-5 == 1e4``) and ``G`` is singular there. In float64 the
    ridge solution is well defined; everything of size ``N`` stays in the input's precision.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens.
    s : torch.Tensor
        ``[B, M, D]`` basis tokens.
    ridge : float
        Ridge added to the diagonal of the Gram matrix.
    """
    m = s.shape[1]
    s64 = s.double()
    gram = s64 @ s64.transpose(1, 2) + ridge * torch.eye(m, dtype=torch.float64, device=s.device)
    rhs = (s @ x.transpose(1, 2)).double()  # [B, M, N]
    coef = torch.linalg.solve(gram, rhs).to(x.dtype)
    return x - coef.transpose(1, 2) @ s


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
