"""Reading per-token attention scores from the context and ranking tokens by them."""

from __future__ import annotations

import torch

from ..types import Context


def attention_row(query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One token's attention to every key, softmax over the keys, averaged over heads.

    ``softmax(q k^T / sqrt(Dh))`` per head in float32, masked keys excluded, then the mean over the
    ``H`` heads: what an eager attention layer would return for that query row, computed without
    materialising the ``L x L`` attention matrix (so it works beside FlashAttention / SDPA).

    Parameters
    ----------
    query : torch.Tensor
        ``[B, H, Dh]``.
    keys : torch.Tensor
        ``[B, H, L, Dh]``.
    key_mask : torch.Tensor, optional
        ``[B, L]`` bool, ``False`` for keys to exclude.

    Returns
    -------
    torch.Tensor
        ``[B, L]`` float32.
    """
    q, k = query.float(), keys.float()
    logits = torch.einsum("bhd,bhld->bhl", q, k) / (q.shape[-1] ** 0.5)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def attention_scores(context: Context, field: str = "cls_attention") -> torch.Tensor:
    """The ``[B, N]`` attention field ``field`` of ``context`` as float32.

    The base class has already checked that the field is present, has shape ``[B, N]`` and holds only
    finite values (a ranking of NaN would be meaningless), so this needs no host synchronisation.
    """
    return getattr(context, field).float()


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, N]`` ordered by decreasing score, ties broken towards the lower position.

    A stable sort, so the order is fully determined (``torch.topk`` and a non-stable
    ``argsort(descending=True)`` leave the order of equal scores unspecified).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices
