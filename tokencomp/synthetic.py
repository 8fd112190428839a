"""Synthetic inputs a strategy needs: a valid :class:`~tokencomp.Context` built from its ``requires``.

Used by the benchmarks (:mod:`tokencomp.analysis.bench`) and the conformance kit
(:mod:`tokencomp.testing`), so that both time and check a strategy on the same kind of context.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .base import Compressor
from .types import Context

__all__ = ["make_context"]

# the in-LLM fields that describe a prompt around the visual tokens
_PROMPT_FIELDS = ("query", "keys", "visual_positions", "key_mask")


def make_context(compressor: Compressor, tokens: torch.Tensor, grid: Optional[tuple[int, ...]] = None) -> Context:
    """A valid :class:`Context` for ``compressor`` on ``tokens`` ``[B, N, D]``, built from its ``requires``.

    Every context is given a ``grid`` (``grid`` or a square one when ``N`` is square). Required
    attention fields are random probability rows, text embeddings are random ``[B, 5, D]``. In-LLM
    fields describe a prompt of 3 text tokens, the ``N`` visual tokens and 4 more text tokens (4 heads of
    8 for ``query`` / ``keys``); ``hidden_states`` then covers that whole prompt.
    """
    b, n, d = tokens.shape
    g = torch.Generator().manual_seed(1)
    fields: dict[str, Any] = {}
    side = int(round(n**0.5))
    if grid is not None:
        fields["grid"] = tuple(grid)
    elif side * side == n:
        fields["grid"] = (side, side)
    for name in compressor.requires:
        if name in _PROMPT_FIELDS:
            _add_prompt_fields(fields, tokens, g)
        elif name != "grid":
            fields[name] = _context_field(compressor, name, tokens, g)
    return Context(**fields)


def _add_prompt_fields(fields: dict[str, Any], tokens: torch.Tensor, g: torch.Generator) -> None:
    """The in-LLM fields of a prompt of 3 text tokens, the N visual tokens, then 4 more text tokens; 4
    heads of 8 (each set once)."""
    b, n, _ = tokens.shape
    length = n + 7
    fields.setdefault("query", torch.randn(b, 4, 8, generator=g).to(tokens.device))
    fields.setdefault("keys", torch.randn(b, 4, length, 8, generator=g).to(tokens.device))
    fields.setdefault("visual_positions", (3 + torch.arange(n, device=tokens.device)).expand(b, n).contiguous())
    fields.setdefault("key_mask", torch.ones(b, length, dtype=torch.bool, device=tokens.device))


def _context_field(compressor: Compressor, name: str, tokens: torch.Tensor, g: torch.Generator) -> Any:
    """The value :func:`make_context` gives the required field ``name`` (not a prompt field, not ``grid``)."""
    b, n, d = tokens.shape
    if name in ("cls_attention", "text_attention"):
        return torch.rand(b, n, generator=g).softmax(-1).to(tokens.device)
    if name == "text_embeddings":
        return torch.randn(b, 5, d, generator=g).to(tokens.device, tokens.dtype)
    if name == "hidden_states":
        if not any(f in compressor.requires for f in _PROMPT_FIELDS):
            return tokens
        # the whole prompt (3 text tokens, the N visual tokens, 4 text tokens), as the keys
        text = torch.randn(b, 7, d, generator=g).to(tokens.device, tokens.dtype)
        return torch.cat([text[:, :3], tokens, text[:, 3:]], dim=1)
    if name == "layer":
        return 2
    if name == "valid":
        return torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    if name == "cross_attention":
        return torch.rand(b, 5, n, generator=g).softmax(-1).to(tokens.device)
    raise AssertionError(f"make_context does not know how to build context.{name}")
