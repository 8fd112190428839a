"""The inputs of the conformance checks: tokens, contexts and the degenerate and padded examples."""

from __future__ import annotations

from typing import Optional

import torch

from ..base import Compressor
from ..types import Context

__all__ = ["B", "D", "GRID", "N", "make_context", "make_tokens"]

GRID = (8, 8)
N = GRID[0] * GRID[1]
D = 12
B = 3

# the in-LLM fields that describe a prompt around the visual tokens
_PROMPT_FIELDS = ("query", "keys", "visual_positions", "key_mask")


def make_tokens(b: int = B, n: int = N, d: int = D, *, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Reproducible random tokens ``[B, N, D]`` with a little structure (clusters plus noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 4, d, generator=g) * 3
    which = torch.randint(4, (b, n), generator=g)
    x = torch.gather(centres, 1, which.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(b, n, d, generator=g)
    return x.to(dtype)


def make_context(compressor: Compressor, tokens: torch.Tensor, grid: Optional[tuple[int, ...]] = None) -> Context:
    """A valid :class:`Context` for ``compressor`` on ``tokens`` ``[B, N, D]``, built from its ``requires``.

    Every context is given a ``grid`` (``grid`` or a square one when ``N`` is square). Required
    attention fields are random probability rows, text embeddings are random ``[B, 5, D]``. In-LLM
    fields describe a prompt of 3 text tokens, the ``N`` visual tokens and 4 more text tokens (4 heads of
    8 for ``query`` / ``keys``); ``hidden_states`` then covers that whole prompt.
    """
    b, n, d = tokens.shape
    g = torch.Generator().manual_seed(1)
    fields: dict = {}
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


def _add_prompt_fields(fields: dict, tokens: torch.Tensor, g: torch.Generator) -> None:
    """The in-LLM fields of a prompt of 3 text tokens, the N visual tokens, then 4 more text tokens; 4
    heads of 8 (each set once)."""
    b, n, _ = tokens.shape
    length = n + 7
    fields.setdefault("query", torch.randn(b, 4, 8, generator=g).to(tokens.device))
    fields.setdefault("keys", torch.randn(b, 4, length, 8, generator=g).to(tokens.device))
    fields.setdefault("visual_positions", (3 + torch.arange(n, device=tokens.device)).expand(b, n).contiguous())
    fields.setdefault("key_mask", torch.ones(b, length, dtype=torch.bool, device=tokens.device))


def _context_field(compressor: Compressor, name: str, tokens: torch.Tensor, g: torch.Generator):
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


def padded_valid() -> torch.Tensor:
    """``valid`` ``[3, N]`` of the padded example: row 0 no padding, row 1 its last 10 positions, row 2
    every 5th one."""
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, -10:] = False
    valid[2, ::5] = False
    return valid


def identical_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, D]`` tokens that are all one random vector ``v`` ``[D]``, and ``v``."""
    g = torch.Generator().manual_seed(2)
    v = torch.randn(D, generator=g) * 3
    return v.expand(B, N, D).contiguous(), v


def rank_two_tokens(distinct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, D]`` tokens spanning two random vectors ``[B, 2, D]``: each token one of the two
    (``distinct=True``, both present) or a random combination of them."""
    g = torch.Generator().manual_seed(3)
    vectors = torch.randn(B, 2, D, generator=g) * 3
    if distinct:
        which = torch.randint(2, (B, N), generator=g)
        which[:, :2] = torch.tensor([0, 1])
        coef = torch.nn.functional.one_hot(which, 2).float()
    else:
        coef = torch.randn(B, N, 2, generator=g)
    return coef @ vectors, vectors


def float16_tokens() -> torch.Tensor:
    """:func:`make_tokens` rounded to multiples of 1/8 in float16: exact after scaling by 2^-10 or 2^11."""
    return (make_tokens() * 8).round().div(8).to(torch.float16)
