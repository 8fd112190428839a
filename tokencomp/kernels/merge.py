"""Matching dropped tokens to kept ones by cosine similarity, and averaging them in."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of the [B, chunk, K] similarity block computed at once; bounds memory for long videos.
_CHUNK = 4096


def cosine_match(src: torch.Tensor, dst: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """Index of the most cosine-similar ``dst`` row for every ``src`` row (first maximum on ties).

    Parameters
    ----------
    src : torch.Tensor
        ``[B, S, D]``.
    dst : torch.Tensor
        ``[B, T, D]`` with ``T >= 1``.
    chunk : int
        Rows of ``src`` handled per matmul, so memory stays ``O(B * chunk * T)``.

    Returns
    -------
    torch.Tensor
        ``[B, S]`` int64 in ``[0, T)``.
    """
    dst_n = F.normalize(dst, dim=-1)
    out = []
    for start in range(0, src.shape[1], chunk):
        block = F.normalize(src[:, start : start + chunk], dim=-1) @ dst_n.transpose(1, 2)
        out.append(block.argmax(dim=-1))
    if not out:
        return torch.zeros(src.shape[0], 0, dtype=torch.int64, device=src.device)
    return torch.cat(out, dim=1)


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
    sums = dst.clone().scatter_add_(1, match.unsqueeze(-1).expand(-1, -1, dst.shape[-1]), src)
    counts = torch.ones(dst.shape[:2], dtype=dst.dtype, device=dst.device)
    counts.scatter_add_(1, match, torch.ones(match.shape, dtype=dst.dtype, device=dst.device))
    return sums / counts.unsqueeze(-1)
