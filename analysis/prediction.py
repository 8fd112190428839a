"""Prediction agreement: does a classifier read the same thing from the compressed tokens?

The read-out is a pretrained head on pooled tokens (for the bundled data: EfficientNet-Lite0's own
ImageNet classifier on the mean token, which is exactly how the network classifies). A merged output
token stands for several inputs, so the fair pooling weights each output by the number of input tokens
``assignment`` gives it (``weighted=True``); the plain mean of the outputs is reported beside it.
"""

from __future__ import annotations

from typing import Callable

import torch

from tokencomp.types import CompressionResult


def pooled(result: CompressionResult, weighted: bool = True) -> torch.Tensor:
    """``[B, D]`` mean of the output tokens, each weighted by the inputs it represents when ``weighted``.

    Outputs that represent nothing but themselves (a kept token) weigh 1; inputs dropped without merging
    (``assignment == -1``) weigh nothing.
    """
    tokens = result.tokens.float()
    assignment = result.assignment
    if tokens.dim() == 2:
        tokens, assignment = tokens[None], assignment[None]
    if not weighted:
        return tokens.mean(dim=1)
    b, k, _ = tokens.shape
    counts = torch.zeros(b, k, device=tokens.device)
    valid = assignment >= 0
    counts.scatter_add_(1, assignment.clamp(min=0), valid.float())
    return (tokens * counts[..., None]).sum(dim=1) / counts.sum(dim=1, keepdim=True)


def pred_agreement(
    head: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, result: CompressionResult, weighted: bool = True
) -> dict[str, torch.Tensor]:
    """Top-1 agreement and KL divergence of ``head`` on the pooled compressed vs the pooled full tokens.

    Parameters
    ----------
    head : callable
        ``[B, D] -> [B, C]`` logits.
    tokens : torch.Tensor
        ``[B, N, D]`` the uncompressed tokens.
    result : CompressionResult
        Their compression.
    weighted : bool
        Pool the outputs weighted by the inputs they represent (see :func:`pooled`).

    Returns
    -------
    dict
        ``agree`` ``[B]`` 1.0 where the top-1 classes match, ``kl`` ``[B]`` ``KL(p_full || p_compressed)``
        in nats.
    """
    x = tokens.float() if tokens.dim() == 3 else tokens[None].float()
    with torch.no_grad():
        full = head(x.mean(dim=1)).float().log_softmax(dim=-1)
        small = head(pooled(result, weighted)).float().log_softmax(dim=-1)
    agree = (full.argmax(dim=-1) == small.argmax(dim=-1)).float()
    kl = (full.exp() * (full - small)).sum(dim=-1).clamp(min=0)
    return {"agree": agree, "kl": kl}
