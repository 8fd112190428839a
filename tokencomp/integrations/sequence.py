"""Shortening a prompt's image-placeholder runs, and keeping later decoding steps consistent with it.

When ``K`` of an image's ``N`` features survive, ``N - K`` of its placeholder tokens must leave the
prompt: the language model then sees a shorter sequence. ``generate`` knows nothing of this and keeps
counting in the original layout (its 2-D attention mask grows from ``L``, its position ids continue
from ``L``), so every decoding step is translated back: the mask loses the same columns, the positions
shift down by the number of tokens removed from that row. Rows that lose different numbers of tokens
(different images per row) are left-padded again to a common length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, overload

import torch

from tokencomp.errors import InputError


@dataclass
class Shortening:
    """Where each column of the shortened prompt comes from.

    Attributes
    ----------
    source : torch.Tensor
        ``[B, L']`` int64, the original column of each new column, ``-1`` for added left padding.
    removed : torch.Tensor
        ``[B]`` int64, tokens removed from each row.
    length : int
        ``L``, the original prompt length.
    """

    source: torch.Tensor
    removed: torch.Tensor
    length: int

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> "Shortening":
        """From a ``[B, L]`` bool mask of the kept columns (kept columns stay in order, rows right-aligned)."""
        b, length = keep.shape
        counts = keep.sum(dim=1)
        width = int(counts.max())
        columns = torch.arange(length, device=keep.device).expand(b, length)
        ordered = torch.where(keep, columns, torch.full_like(columns, -1)).sort(dim=1).values
        return cls(source=ordered[:, length - width :], removed=length - counts, length=length)

    @property
    def kept_length(self) -> int:
        return int(self.source.shape[1])

    @overload
    def apply(self, tensor: torch.Tensor, fill: int | float = 0) -> torch.Tensor: ...

    @overload
    def apply(self, tensor: None, fill: int | float = 0) -> None: ...

    def apply(self, tensor: Optional[torch.Tensor], fill: int | float = 0) -> Optional[torch.Tensor]:
        """``tensor`` ``[B, L, ...]`` in the shortened layout; added padding columns get ``fill``."""
        if tensor is None:
            return None
        index = self.source.clamp(min=0).to(tensor.device)
        extra = tensor.dim() - 2
        shape = (*index.shape, *([1] * extra))
        gathered = tensor.gather(1, index.view(shape).expand(*index.shape, *tensor.shape[2:]))
        return gathered.masked_fill((self.source < 0).to(tensor.device).view(shape), fill)


def placeholder_keep(input_ids: torch.Tensor, token_id: int, per_image: int, kept: int) -> torch.Tensor:
    """``[B, L]`` bool: keep every non-placeholder and the first ``kept`` placeholders of each image.

    Placeholders of consecutive images are counted in order along the row, ``per_image`` each.

    Raises
    ------
    ValueError
        If a row's placeholder count is not a multiple of ``per_image``.
    """
    is_image = input_ids == token_id
    counts = is_image.sum(dim=1)
    if bool((counts % per_image != 0).any()):
        raise InputError(
            f"tokencomp: the prompt has {counts.tolist()} image placeholder tokens per row, not a multiple of the "
            f"{per_image} features per image; the processor and the model disagree on the image size."
        )
    rank = torch.cumsum(is_image.long(), dim=1) - 1
    return ~is_image | (rank % per_image < kept)


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
        ``[B, new_length]`` (or ``[3, B, new_length]``) in the original numbering.
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
    b = state.source.shape[0]
    generated = past_length - state.kept_length
    if generated < 0:
        return attention_mask, position_ids, False
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != state.length + generated + new_length:
            return attention_mask, position_ids, False
        head = state.apply(attention_mask[:, : state.length])
        attention_mask = torch.cat([head, attention_mask[:, state.length :]], dim=1)
    if position_ids is not None:
        shift = state.removed.to(position_ids.device)
        position_ids = position_ids - (shift.view(1, b, 1) if position_ids.dim() == 3 else shift.view(b, 1))
    return attention_mask, position_ids, True


def instruction_embeddings(embed: torch.nn.Module, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """``[B, T, D]`` input embeddings of the instruction: the last ``T`` tokens of each row after its last
    visual token, ``T`` the shortest such tail in the batch (rows are left-padded, so these are real tokens).

    Raises
    ------
    ValueError
        If a row has no token after its last visual token.
    """
    length = input_ids.shape[1]
    columns = torch.arange(length, device=input_ids.device)
    last = torch.where(visual, columns, torch.full_like(columns, -1)).amax(dim=1)
    tail = int((length - 1 - last).min())
    if tail < 1:
        raise InputError(
            "tokencomp: the strategy needs the instruction's embeddings, but a prompt has no text after its image."
        )
    return embed(input_ids[:, length - tail :])


def item_rows(placeholders: torch.Tensor, lengths: list[int]) -> list[int]:
    """The batch row of each visual item (image or video) whose ``lengths`` placeholders run, in order,
    through the ``[B, L]`` bool ``placeholders`` row by row: the row of its first placeholder."""
    starts = torch.tensor([0] + lengths[:-1], device=placeholders.device).cumsum(0)
    return placeholders.nonzero()[:, 0][starts].tolist()
