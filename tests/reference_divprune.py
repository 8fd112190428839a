"""A literal re-statement of DivPrune as the authors' code runs it (one sample, the full N x N matrix)."""

from __future__ import annotations

import torch


def literal_divprune(x: torch.Tensor, k: int) -> list[int]:
    """Positions picked by the authors' greedy loop, in pick order, for one sample ``x`` ``[N, D]``."""
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.t()
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[torch.tensor(picks)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return picks
