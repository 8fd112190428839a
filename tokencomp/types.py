"""Result and context types shared by every strategy."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

__all__ = ["CompressionResult", "Context"]


@dataclass
class CompressionResult:
    """What a compressor returns.

    Attributes
    ----------
    tokens : torch.Tensor
        ``[B, K, D]`` (or ``[K, D]`` for unbatched input) compressed tokens, in the input's dtype and
        device, ordered by ``indices``.
    indices : torch.Tensor
        ``[B, K]`` int64, the original position each output token sits at, strictly ascending.
    assignment : torch.Tensor
        ``[B, N]`` int64, the output slot that represents each input token: its own slot when it is
        kept, its merge target when it was merged, ``-1`` when it was dropped without merging. For every
        output slot ``k``, ``assignment[b, indices[b, k]] == k``.
    info : dict
        Method-specific tensors (for ApET ``basis_indices`` ``[B, M]`` and ``errors`` ``[B, N]``).
    """

    tokens: torch.Tensor
    indices: torch.Tensor
    assignment: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        """Number of output tokens ``K``."""
        return self.indices.shape[-1]


@dataclass
class Context:
    """Optional side information for :meth:`Compressor.compress`.

    Every field is optional. A strategy that needs a field that is missing raises a ``ValueError``
    naming the field. Tensor fields are batched like the tokens (a leading ``B`` dimension) or, for
    unbatched tokens, may omit it.

    Attributes
    ----------
    grid : tuple of int, optional
        Token layout, ``(h, w)`` for an image or ``(t, h, w)`` for a video, with ``prod(grid) == N``.
    cls_attention : torch.Tensor, optional
        ``[B, N]`` attention of the vision tower's [CLS] token to the visual tokens.
    text_embeddings : torch.Tensor, optional
        ``[B, T, D]`` embeddings of the instruction's tokens.
    text_attention : torch.Tensor, optional
        ``[B, N]`` attention of the text (or last) token to the visual tokens.
    hidden_states : torch.Tensor, optional
        ``[B, L, H]`` hidden states of the language model, for strategies that run inside it.
    layer : int, optional
        Index of the decoder layer the strategy runs after.
    valid : torch.Tensor, optional
        ``[B, N]`` bool, ``False`` at padding positions of a padded batch.
    generator : torch.Generator, optional
        Source of randomness; overrides the strategy's ``seed``.
    cross_attention : torch.Tensor, optional
        ``[B, T, N]`` attention of each of ``T`` text tokens to the visual tokens at ``layer``,
        averaged over heads (SparseVLM's text raters).
    query : torch.Tensor, optional
        ``[B, H, Dh]`` query of the rater token (the last instruction token) at ``layer``, with its
        rotary embedding applied, for strategies that compute one attention row themselves.
    keys : torch.Tensor, optional
        ``[B, H, L, Dh]`` keys of the ``L`` tokens the rater attends to at ``layer`` (rotary applied,
        key/value heads repeated to ``H``).
    visual_positions : torch.Tensor, optional
        ``[B, N]`` int64 positions of the visual tokens among the ``L`` keys.
    key_mask : torch.Tensor, optional
        ``[B, L]`` bool, ``False`` for keys the rater must not attend to (padding).
    image_embeddings : torch.Tensor, optional
        ``[B, N, E]`` the visual tokens in the joint image-text space of ``text_embeddings`` (for CLIP:
        the vision tower's post-layernorm and visual projection), for strategies that score the tokens'
        relevance to the instruction. When absent, such strategies use the tokens themselves.
    """

    grid: Optional[tuple[int, ...]] = None
    cls_attention: Optional[torch.Tensor] = None
    text_embeddings: Optional[torch.Tensor] = None
    text_attention: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None
    layer: Optional[int] = None
    valid: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    cross_attention: Optional[torch.Tensor] = None
    query: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    visual_positions: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None
    image_embeddings: Optional[torch.Tensor] = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all context fields."""
        return tuple(f.name for f in fields(cls))
