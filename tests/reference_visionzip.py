"""A literal, loop-based re-statement of VisionZip (``dvlab-research/VisionZip``,
``visionzip/clip_encoder.py``), one image at a time, with the tokens standing in for the keys."""

from __future__ import annotations

import torch


def literal_visionzip(
    x: torch.Tensor,
    attn: torch.Tensor,
    dominant: int,
    contextual: int,
    merge: str = "target_plus_mean",
    order: str = "authors",
):
    """Return (positions, tokens, assignment) for one image ``x`` ``[N, D]`` with attention ``[N]``.

    ``order="authors"``: ``torch.cat([dominant_tokens, contextual_tokens])``, the dominant tokens as
    ``masked_select`` lists them (ascending), then one contextual token per target in target order
    (ascending among the remaining tokens); ``"position"``: ascending position."""
    x = x.float()
    n = x.shape[0]
    a = [float(v) for v in attn]
    ranked = sorted(range(n), key=lambda i: (-a[i], i))
    dom = sorted(ranked[:dominant])
    rem = [i for i in range(n) if i not in set(dom)]  # ascending, like masked_select
    values = {p: x[p].clone() for p in dom}
    owner = {p: p for p in dom}
    targets = []
    if contextual > 0:
        m = len(rem)
        step = max(1, m // contextual)
        target_ranks = list(range(0, m, step))[:contextual]
        targets = [rem[t] for t in target_ranks]
        others = [rem[i] for i in range(m) if i not in target_ranks]
        groups = {t: [] for t in targets}
        for o in others:
            best, best_sim = None, None
            for t in targets:
                sim = float((x[o] / x[o].norm()) @ (x[t] / x[t].norm()))
                if best_sim is None or sim > best_sim:  # first maximum
                    best, best_sim = t, sim
            groups[best].append(o)
        for t in targets:
            members = groups[t]
            if merge == "target_plus_mean":
                agg = torch.stack([x[o] for o in members]).mean(0) if members else torch.zeros_like(x[t])
                values[t] = x[t] + agg
            else:
                values[t] = (x[t] + sum((x[o] for o in members), torch.zeros_like(x[t]))) / (1 + len(members))
            owner[t] = t
            for o in members:
                owner[o] = t
    positions = dom + targets if order == "authors" else sorted(values)
    slot = {p: s for s, p in enumerate(positions)}
    assignment = [slot[owner[i]] if i in owner else -1 for i in range(n)]
    return positions, torch.stack([values[p] for p in positions]), assignment
