"""Shortening a prompt's image-placeholder runs, and keeping later decoding steps consistent with it.

When ``K`` of an image's ``N`` features survive, ``N - K`` of its placeholder tokens must leave the
prompt: the language model then sees a shorter sequence, numbered ``0 .. L' - 1``. ``generate`` knows
nothing of this and keeps counting in the original layout (its 2-D attention mask grows from ``L``,
its position ids continue from ``L``), so every decoding step is translated back: the mask loses the
same columns, the positions shift down by the number of tokens removed from that row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Shortening:
    """The columns kept from one prefill's prompt.

    Attributes
    ----------
    keep : torch.Tensor
        ``[B, L]`` bool over the original prompt.
    removed : torch.Tensor
        ``[B]`` int64, tokens removed from each row.
    """

    keep: torch.Tensor
    removed: torch.Tensor

    @property
    def kept_length(self) -> int:
        return int(self.keep.shape[1] - self.removed[0])


def placeholder_keep(input_ids: torch.Tensor, token_id: int, per_image: int, kept: int) -> torch.Tensor:
    """``[B, L]`` bool: keep every non-placeholder and the first ``kept`` placeholders of each image.

    Placeholders of consecutive images are counted in order along the row, ``per_image`` each.

    Raises
    ------
    ValueError
        If a row's placeholder count is not a multiple of ``per_image``, or rows would end up with
        different lengths (a different number of images per row).
    """
    is_image = input_ids == token_id
    counts = is_image.sum(dim=1)
    if bool((counts % per_image != 0).any()):
        raise ValueError(
            f"tokencomp: the prompt has {counts.tolist()} image placeholder tokens per row, not a multiple of the "
            f"{per_image} features per image; the processor and the model disagree on the image size."
        )
    rank = torch.cumsum(is_image.long(), dim=1) - 1
    keep = ~is_image | (rank % per_image < kept)
    removed = (~keep).sum(dim=1)
    if bool((removed != removed[0]).any()):
        raise ValueError(
            "tokencomp: rows of this batch hold different numbers of images "
            f"({(counts // per_image).tolist()}); give every row the same number of images."
        )
    return keep


def shorten(tensor: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
    """``tensor[..., keep]`` row by row for a ``[B, L]`` (or ``[B, L, ...]``) tensor; ``None`` stays ``None``."""
    if tensor is None:
        return None
    b = keep.shape[0]
    if tensor.dim() == 2:
        return tensor[keep].view(b, -1)
    return tensor[keep].view(b, -1, *tensor.shape[2:])


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them from a 2-D mask (left padding at position 0)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def translate_decode(
    state: Shortening,
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    past_length: int,
    new_length: int,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], bool]:
    """Map one decoding step's inputs from the original layout to the shortened one.

    Parameters
    ----------
    state : Shortening
        The prefill's kept columns.
    attention_mask : torch.Tensor or None
        ``[B, L + t]`` in the original layout.
    position_ids : torch.Tensor or None
        ``[B, new_length]`` (or ``[3, B, new_length]`` for M-RoPE) in the original numbering.
    past_length : int
        Tokens already in the (shortened) cache.
    new_length : int
        Tokens in this step's input.

    Returns
    -------
    tuple
        ``(attention_mask, position_ids, matched)``; ``matched`` is False when the inputs do not
        continue that prefill (then they are returned unchanged).
    """
    b, full = state.keep.shape
    generated = past_length - state.kept_length
    if generated < 0:
        return attention_mask, position_ids, False
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != full + generated + new_length:
            return attention_mask, position_ids, False
        tail = torch.ones(b, generated + new_length, dtype=torch.bool, device=state.keep.device)
        attention_mask = shorten(attention_mask, torch.cat([state.keep, tail], dim=1))
    if position_ids is not None:
        shift = state.removed.to(position_ids.device)
        position_ids = position_ids - (shift.view(1, b, 1) if position_ids.dim() == 3 else shift.view(b, 1))
    return attention_mask, position_ids, True
