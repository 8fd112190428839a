"""The inputs of the conformance checks: tokens, contexts and the degenerate and padded examples."""

from __future__ import annotations

import torch

from ..synthetic import make_context

__all__ = ["B", "D", "GRID", "N", "make_context", "make_tokens"]

GRID = (8, 8)
N = GRID[0] * GRID[1]
D = 12
B = 3


def make_tokens(b: int = B, n: int = N, d: int = D, *, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Reproducible random tokens ``[B, N, D]`` with a little structure (clusters plus noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 4, d, generator=g) * 3
    which = torch.randint(4, (b, n), generator=g)
    x = torch.gather(centres, 1, which.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(b, n, d, generator=g)
    return x.to(dtype)


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
