"""Reading per-token attention scores from the context and ranking tokens by them."""

from __future__ import annotations

import math

import torch

from ..types import Context


def attention_row(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One token's attention to every key, softmax over the keys, averaged over heads.

    ``softmax(q k^T / sqrt(Dh))`` per head in float32, masked keys excluded, then the mean over the
    ``H`` heads: what an eager attention layer would return for that query row, computed without
    materialising the ``L x L`` attention matrix (so it works beside FlashAttention / SDPA).

    With ``dtype`` (a half precision, :func:`~tokencomp.kernels.half_precision`), the arithmetic of a
    transformers eager attention layer in that dtype (and of PyramidDrop's code): the product ``q k^T``
    and the division by ``sqrt(Dh)`` in ``dtype``, the softmax upcast to float32, its result cast back to
    ``dtype``, and the mean over the heads in ``dtype``.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, H, Dh]``.
    keys : torch.Tensor
        ``[B, H, L, Dh]``.
    key_mask : torch.Tensor, optional
        ``[B, L]`` bool, ``False`` for keys to exclude.
    dtype : torch.dtype, optional
        Compute in this dtype as described above; ``None`` (default): in float32.

    Returns
    -------
    torch.Tensor
        ``[B, L]`` float32, or ``dtype``.
    """
    if dtype is not None:
        return _attention_row_in(query.to(dtype), keys.to(dtype), key_mask)
    q, k = query.float(), keys.float()
    logits = torch.einsum("bhd,bhld->bhl", q, k) / (q.shape[-1] ** 0.5)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def _attention_row_in(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`attention_row` in the dtype of ``q`` and ``k``: eager attention's arithmetic, per head."""
    logits = torch.matmul(q.unsqueeze(2), k.transpose(2, 3)).squeeze(2) / math.sqrt(q.shape[-1])  # [B, H, L]
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype).mean(dim=1)


def attention_scores(context: Context, field: str = "cls_attention", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``[B, N]`` attention field ``field`` of ``context`` as float32, or rounded to ``dtype``.

    The base class has already checked that the field is present, has shape ``[B, N]`` and holds only
    finite values (a ranking of NaN would be meaningless), so this needs no host synchronisation.

    ``dtype`` (a half precision, :func:`~tokencomp.kernels.half_precision`) rounds the scores to it: the
    head average the authors take in a float16 model, when the field holds the float32 mean of that
    model's half-precision attention weights (which is how the integrations fill it; torch's half-precision
    mean accumulates in float32 and rounds once, so the two agree).
    """
    return getattr(context, field).to(dtype if dtype is not None else torch.float32)


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, N]`` ordered by decreasing score, ties broken towards the lower position.

    A stable sort, so the order is fully determined (``torch.topk`` and a non-stable
    ``argsort(descending=True)`` leave the order of equal scores unspecified).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices
