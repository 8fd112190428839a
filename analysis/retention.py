"""Information retention: how well the compressed tokens stand for the input tokens."""

from __future__ import annotations

import torch

from tokencomp.kernels import batched_gather
from tokencomp.types import CompressionResult


def _batched(tokens: torch.Tensor, result: CompressionResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if tokens.dim() == 2:
        return tokens[None].float(), result.tokens[None].float(), result.assignment[None]
    return tokens.float(), result.tokens.float(), result.assignment


def reconstruct(tokens: torch.Tensor, result: CompressionResult) -> torch.Tensor:
    """Rebuild every input token from the outputs through ``result.assignment``.

    A kept or merged token is replaced by the output slot that represents it; a token dropped without
    merging (``-1``) by the output nearest to it in L2.

    Returns
    -------
    torch.Tensor
        ``[B, N, D]`` float32 (or ``[N, D]`` for unbatched input).
    """
    x, y, a = _batched(tokens, result)
    nearest = torch.cdist(x, y).argmin(dim=-1)
    slot = torch.where(a >= 0, a, nearest)
    rebuilt = batched_gather(y, slot)
    return rebuilt[0] if tokens.dim() == 2 else rebuilt


def recon_error(tokens: torch.Tensor, result: CompressionResult) -> torch.Tensor:
    """Relative Frobenius error ``||X - X_rebuilt||_F / ||X||_F`` per image (see :func:`reconstruct`).

    0 when every token is kept unchanged; returns ``[B]`` (a scalar for unbatched input).
    """
    x, _, _ = _batched(tokens, result)
    rebuilt = reconstruct(tokens, result)
    rebuilt = rebuilt[None] if tokens.dim() == 2 else rebuilt
    err = (x - rebuilt).flatten(1).norm(dim=-1) / x.flatten(1).norm(dim=-1)
    return err[0] if tokens.dim() == 2 else err


def lstsq_error(tokens: torch.Tensor, result: CompressionResult) -> torch.Tensor:
    """Relative Frobenius error of the input tokens rebuilt from the linear span of the outputs.

    Each input row is replaced by its orthogonal projection on the row space of the ``K`` output
    tokens, so this measures what a linear read-out of the compressed tokens can recover, regardless
    of which output stands for which input. Returns ``[B]`` (a scalar for unbatched input).
    """
    x, y, _ = _batched(tokens, result)
    # Orthonormal rows spanning the outputs: Q = L^{-1} Y with L L^T = Y Y^T + delta I (Cholesky of the
    # small K x K Gram matrix in float64, delta = K * eps * its largest diagonal entry, so repeated or
    # collinear outputs cost nothing). A pseudo-inverse applied in float32 is useless when outputs are
    # nearly collinear, and batched eigh/svd can be pathologically slow on such matrices.
    y64 = y.double()
    gram = y64 @ y64.transpose(1, 2)
    k = gram.shape[-1]
    eps = torch.finfo(torch.float64)
    delta = (gram.diagonal(dim1=-2, dim2=-1).amax(-1) * k * eps.eps).clamp_min(eps.tiny)
    chol = torch.linalg.cholesky(gram + delta[:, None, None] * torch.eye(k, dtype=torch.float64, device=y.device))
    q = torch.linalg.solve_triangular(chol, y64, upper=False).to(x.dtype)  # [B, K, D]
    projected = (x @ q.transpose(1, 2)) @ q
    err = (x - projected).flatten(1).norm(dim=-1) / x.flatten(1).norm(dim=-1)
    return err[0] if tokens.dim() == 2 else err
