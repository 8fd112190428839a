"""Reading per-token attention scores from the context and ranking tokens by them."""

from __future__ import annotations

import torch

from ..types import Context


def attention_scores(owner: str, context: Context, field: str = "cls_attention") -> torch.Tensor:
    """The ``[B, N]`` attention field ``field`` of ``context`` as float32, checked to be finite.

    The base class has already checked that the field is present and has shape ``[B, N]``.

    Raises
    ------
    ValueError
        If the scores contain NaN or infinite values (a ranking of them would be meaningless).
    """
    scores = getattr(context, field).float()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(
            f"{owner}: context.{field} contains NaN or infinite values; pass finite attention weights."
        )
    return scores


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, N]`` ordered by decreasing score, ties broken towards the lower position.

    A stable sort, so the order is fully determined (``torch.topk`` and a non-stable
    ``argsort(descending=True)`` leave the order of equal scores unspecified).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices
