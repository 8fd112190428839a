"""A literal re-statement of CDPruner's ``encode_images`` selection (authors' code), batch of one."""

from __future__ import annotations

import torch


def literal_cdpruner(
    features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, k: int
) -> list[int]:
    """Picks in pick order for one sample: ``features`` ``[N, D]``, ``image_embeds`` ``[N, C]``,
    ``text_embeds`` ``[M, C]``."""
    image_features = features[None]  # (1, N, D)
    B, N, _ = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds[None] / image_embeds[None].norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((k, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((k, B), dtype=torch.long)
    for i in range(k):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (
            kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])
        ) / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return select_idx[:, 0].tolist()
