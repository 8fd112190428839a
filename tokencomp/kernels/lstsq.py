"""Ridge least-squares reconstruction of tokens from a few basis tokens, and its error norms."""

from __future__ import annotations

import torch

from tokencomp.errors import InputError

from .basis import PivotedQR
from .blocks import compute_dtype, pow2_scale, row_blocks, rows_matmul, token_scale

ERROR_NORMS = ("l2", "l1", "linf", "relative")


def ridge_coefficients(x: torch.Tensor, s: torch.Tensor, ridge: float) -> torch.Tensor:
    """Coefficients ``C^T = solve(S S^T + ridge I, S X^T)`` of every token on the basis, ``[B, M, N]``.

    The ``M x M`` system is formed and solved in float64: with repeated basis tokens (random
    sampling with replacement, or FPS on rank-deficient tokens) and token norms above ~100, a small
    ridge vanishes in float32 (``1e4 + 1e-5 == 1e4``) and ``G`` is singular there. In float64 the
    ridge solution is well defined; ``S X^T`` (size ``M N``) is formed in the compute dtype
    (float32, or float64 for float64 tokens) and the result is returned in it.

    Every term is formed on the tokens and the basis scaled by ``f = token_scale(x)`` (a power of two
    per batch row, :func:`~tokencomp.kernels.blocks.token_scale`) with the ridge scaled by ``f^2``: the
    same system times ``f^2``, hence the same coefficients (bit for bit on tokens of ordinary size), but
    ``S X^T`` does not overflow float32 for tokens of size ``1e30`` (nor vanish for ``1e-30``). Where
    the ridge is too small to change ``S S^T`` in float64 (below ``M eps`` times its largest diagonal
    entry: tokens of norm above ~``1e5``, where repeated basis tokens would make the system exactly
    singular), the smallest ridge float64 resolves, ``M eps`` times that entry, is used instead: the
    solution is then the ridge's limit (the least-squares solution) to float64 precision.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.
    s : torch.Tensor
        ``[B, M, D]`` basis tokens in the compute dtype of ``x``.
    ridge : float
        Ridge added to the diagonal of the Gram matrix.
    """
    return _ridge_coefficients(x, s, ridge, token_scale(x).to(s.dtype))


def _ridge_coefficients(x: torch.Tensor, s: torch.Tensor, ridge: float, f: torch.Tensor) -> torch.Tensor:
    """:func:`ridge_coefficients` given ``f = token_scale(x)`` ``[B, 1, 1]`` in the dtype of ``s``."""
    m = s.shape[1]
    s64 = (s * f).double()
    sst = s64 @ s64.transpose(1, 2)
    largest = torch.diagonal(sst, dim1=1, dim2=2).amax(dim=1, keepdim=True).unsqueeze(-1)  # [B, 1, 1]
    lam = _effective_ridge(ridge, f, largest, m)
    gram = sst + lam * torch.eye(m, dtype=torch.float64, device=s.device)
    # s f f, not s f^2: f^2 overflows float32 for tokens of size 1e-30
    rhs = rows_matmul(x, (s * f * f).transpose(1, 2)).transpose(1, 2)  # [B, M, N]
    # solve_ex: no check of LAPACK's status, which would synchronise with a GPU (the ridge makes G definite)
    return torch.linalg.solve_ex(gram, rhs.double())[0].to(compute_dtype(x.dtype))


def _effective_ridge(ridge: float, f: torch.Tensor, largest: torch.Tensor, m: int) -> torch.Tensor:
    """``[B, 1, 1]`` float64 ridge for the basis Gram matrix of tokens scaled by ``f``: ``ridge f^2``, raised to
    ``M eps`` times its ``largest`` diagonal entry where it is too small to change that matrix in float64."""
    return torch.maximum(ridge * f.double().square(), m * torch.finfo(torch.float64).eps * largest)


def _ratio_or_zero(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, and 0 where ``den`` is 0 (a zero token, which any basis rebuilds exactly)."""
    nonzero = den > 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def ridge_residual(x: torch.Tensor, s: torch.Tensor, ridge: float) -> torch.Tensor:
    """Residual ``X - C S`` of rebuilding every token from the basis rows by ridge regression.

    ``[B, N, D]`` in the compute dtype; :func:`ridge_errors` gives its row norms without forming it.
    See :func:`ridge_coefficients` for the solve.
    """
    coef = ridge_coefficients(x, s, ridge)
    return torch.baddbmm(x.to(coef.dtype), coef.transpose(1, 2), s, alpha=-1)


def ridge_errors(x: torch.Tensor, s: torch.Tensor, ridge: float, norm: str) -> torch.Tensor:
    """Per-token error ``[B, N]`` of the ridge reconstruction under ``norm``, in row blocks.

    Equal to ``residual_errors(ridge_residual(x, s, ridge), x, norm)``, but the residual is formed
    one row block at a time, so the extra memory is one block rather than the tokens' size. The
    residual is formed from the tokens and the basis scaled by ``f = token_scale(x)`` (a power of two
    per batch row) and its norms divided by ``f``: the same values (bit for bit on tokens of ordinary
    size), without overflow for tokens of size ``1e30``.
    """
    f = token_scale(x).to(s.dtype)  # [B, 1, 1]
    coef = _ridge_coefficients(x, s, ridge, f).transpose(1, 2)  # [B, N, M]
    b, n, d = x.shape
    sf = s * f
    out = torch.empty(b, n, dtype=coef.dtype, device=x.device)
    for blk in row_blocks(b, n, d):
        rows = torch.mul(x[:, blk], f)  # scaled rows, in the compute dtype
        out[:, blk] = _errors(torch.baddbmm(rows, coef[:, blk], sf, alpha=-1), rows, norm)
    return out if norm == "relative" else out.div_(f.view(b, 1))


def pivoted_ridge_errors(qr: PivotedQR, ridge: float, norm: str = "l2") -> torch.Tensor:
    """:func:`ridge_errors` (``l2`` or ``relative``) for the basis of the QR pivots, from the factorisation alone.

    With ``Q`` the orthonormal basis of the pivots' span, every scaled token is ``x_i f = L_i Q + rho_i``
    and the scaled basis is ``S f = L_p Q`` (``L_p`` the factor's pivot rows, ``M x M``). The ridge
    problem ``min_c |x_i f - c S f|^2 + lam |c|^2`` (``lam = ridge f^2``: the system
    :func:`ridge_coefficients` solves) therefore splits into the part orthogonal to the span, which no
    coefficient changes, and an ``M``-dimensional one, and its residual is exactly

    ``|x_i f - c_i S f|^2 = r_i^2 + |L_i P|^2``, with ``P = lam (L_p^T L_p + lam I)^-1``

    (``I - B^T (B B^T + lam I)^-1 B = lam (B^T B + lam I)^-1``). ``r_i^2`` is the downdated residual
    of :func:`~tokencomp.kernels.qr_pivots`, so the tokens are not read again: ``O(M^2 N)`` (``P`` in
    float64, the product with ``L`` in the factor's dtype) instead of a pass forming the ``[N, D]``
    residual. As in :func:`ridge_coefficients`, a ridge too
    small to change ``L_p^T L_p`` in float64 is raised to ``M eps`` times the largest squared basis norm.

    Both terms are non-negative, so there is no cancellation between them; ``r_i^2`` itself carries
    the rounding of the downdating, about ``M eps`` times ``|x_i|^2`` (float32), so a token the basis
    explains almost exactly has an error of order ``sqrt(M eps) |x_i|`` rather than ``eps |x_i|``
    (LAPACK's norm downdating has the same property). Tokens with larger errors, the ones ApET keeps,
    are accurate to a few units in the last place.

    Parameters
    ----------
    qr : PivotedQR
        :func:`~tokencomp.kernels.qr_pivots` of the tokens.
    ridge : float
        Ridge added to the diagonal of the basis Gram matrix (before scaling).
    norm : {"l2", "relative"}
        ``l2``: the residual's Euclidean norm; ``relative``: divided by the token's own norm (0 for a
        zero token).

    Returns
    -------
    torch.Tensor
        ``[B, N]`` in the dtype of the factor.
    """
    if norm not in ("l2", "relative"):
        raise InputError(
            f"pivoted_ridge_errors: norm {norm!r} needs the residual rows; allowed here: 'l2', 'relative' "
            "(use ridge_errors for the others)."
        )
    factor = qr.factor  # [B, N, M]
    b, n, m = factor.shape
    lp = torch.gather(factor, 1, qr.pivots.unsqueeze(-1).expand(b, m, m)).double()  # [B, M, M]
    lam = _effective_ridge(ridge, qr.scale, qr.norms.amax(dim=-1).double().view(b, 1, 1), m)  # [B, 1, 1]
    gram = torch.bmm(lp.transpose(1, 2), lp)
    gram.diagonal(dim1=1, dim2=2).add_(lam.view(b, 1))
    # |L_i P| with P = lam (L_p^T L_p + lam I)^-1, solved in float64, applied in the factor's dtype
    p = torch.linalg.inv_ex(gram)[0].mul_(lam).to(factor.dtype)  # _ex: no status check (a GPU sync)
    squared = torch.linalg.vector_norm(torch.bmm(factor, p), dim=-1).square_().add_(qr.residual)  # [B, N]
    if norm == "relative":
        return _ratio_or_zero(squared, qr.norms).sqrt_()
    return squared.sqrt_().div_(qr.scale.view(b, 1))


def _errors(residual: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """:func:`residual_errors` computed directly (the caller has scaled the rows)."""
    if norm == "l2":
        return residual.norm(dim=-1)
    if norm == "l1":
        return residual.abs().sum(dim=-1)
    if norm == "linf":
        return residual.abs().amax(dim=-1)
    if norm == "relative":
        return _ratio_or_zero(residual.norm(dim=-1), x.norm(dim=-1))
    raise InputError(f"unknown error norm {norm!r}; allowed: {', '.join(ERROR_NORMS)}")


def _l2(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean norms ``[B, N]`` of ``rows`` ``[B, N, D]`` as ``(norm of the rows scaled by f, f)``: the norm
    is the first divided by the power of two ``f`` (:func:`~tokencomp.kernels.blocks.pow2_scale`), so its
    squares neither overflow nor underflow."""
    f = pow2_scale(rows)
    return (rows * f).norm(dim=-1), f.squeeze(-1)


def residual_errors(residual: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-token error ``[B, N]`` of a residual ``[B, N, D]`` under ``norm``.

    ``l2``: Euclidean norm of the residual row (the authors' choice); ``l1``: sum of absolute values;
    ``linf``: largest absolute value; ``relative``: ``l2`` divided by the token's own L2 norm (0 for a
    zero token, which any basis rebuilds exactly). Norms and sums are taken of each row scaled by a
    power of two, then scaled back: the same values, without the overflow of the squares of a token of
    size ``1e30`` or the underflow of those of size ``1e-30``.
    """
    if norm == "l2":
        scaled, f = _l2(residual)
        return scaled / f
    if norm == "l1":
        f = pow2_scale(residual)
        return (residual * f).abs().sum(dim=-1) / f.squeeze(-1)
    if norm == "linf":
        return residual.abs().amax(dim=-1)
    if norm == "relative":
        own, f_own = _l2(x)
        err, f_err = _l2(residual)
        return _ratio_or_zero(err, own) * (f_own / f_err)
    raise InputError(f"unknown error norm {norm!r}; allowed: {', '.join(ERROR_NORMS)}")
