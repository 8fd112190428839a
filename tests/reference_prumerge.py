"""A literal, loop-based re-statement of LLaVA-PruMerge (``42Shawn/LLaVA-PruMerge``,
``llava/model/multimodal_encoder/clip_encoder.py``), one image at a time, with the tokens standing
in for the keys and the documented exact-``K`` rule in place of the adaptive count."""

from __future__ import annotations

import numpy as np
import torch


def literal_outlier_count(attn: torch.Tensor) -> int:
    """The number of tokens the authors keep for one image: ``outlier_dectection``'s ratio, then
    ``int(N * reduction_ratio)`` as their ``topk`` call takes it."""
    a = attn.to(torch.float32).numpy().flatten()
    q1 = np.percentile(a, 25)
    q3 = np.percentile(a, 75)
    upper = q3 + 1.5 * (q3 - q1)
    reduction_ratio = len(np.where(a > upper)[0]) / len(a)
    return int(len(a) * reduction_ratio)


def literal_prumerge(
    x: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    *,
    knn: int = 32,
    plus: bool = False,
    extra_token: bool = True,
    order: str = "authors",
):
    """Return (positions, tokens, assignment, num_outliers) for one image ``x`` ``[N, D]``.

    ``order="authors"``: the outputs as the authors' code concatenates them, the centres in the order
    of their ``idx`` (``topk`` by attention; PruMerge+ appends the spatial samples, ascending) and the
    extra token last; ``"position"``: ascending position."""
    x = x.float()
    n = x.shape[0]
    a = [float(v) for v in attn]
    m = literal_outlier_count(attn)
    kc = k - 1 if extra_token else k
    ranked = sorted(range(n), key=lambda i: (-a[i], i))
    if not plus:
        centres = ranked[:kc]
    else:
        o = min(m, kc)
        centres = ranked[:o]
        rest = [i for i in range(n) if i not in set(centres)]
        u = kc - o
        centres = centres + [rest[(j * len(rest)) // u] for j in range(u)]
    non_centres = [i for i in range(n) if i not in set(centres)]  # ascending, like complement_idx

    unit = [x[i] / x[i].norm() for i in range(n)]
    values, nbr_sims = {}, {}
    for i, c in enumerate(centres):
        rest_idx = centres[:i] + centres[i + 1 :] + non_centres
        sims = [float(unit[c] @ unit[j]) for j in rest_idx]
        top = sorted(range(len(rest_idx)), key=lambda t: -sims[t])[:knn]
        weighted = torch.zeros_like(x[c])
        for t in top:
            weighted = weighted + a[rest_idx[t]] * x[rest_idx[t]]
        values[c] = x[c] + weighted  # updated_center = x_i + sum(attn_j * x_j), unnormalised
        nbr_sims[c] = {rest_idx[t]: sims[t] for t in top}
    extra_pos = None
    if extra_token:
        extra = torch.zeros_like(x[0])
        for j in non_centres:
            extra = extra + a[j] * x[j]
        extra_pos = min(non_centres, key=lambda j: (-a[j], j))
        values[extra_pos] = extra
    positions = list(centres) + ([extra_pos] if extra_token else [])
    if order == "position":
        positions = sorted(positions)
    slot = {p: s for s, p in enumerate(positions)}
    assignment = []
    for j in range(n):
        if j in slot:
            assignment.append(slot[j])
            continue
        takers = [(s, c) for c, nb in nbr_sims.items() for jj, s in nb.items() if jj == j]
        if takers:
            best = max(s for s, _ in takers)
            assignment.append(min(slot[c] for s, c in takers if s == best))
        else:
            assignment.append(slot[extra_pos] if extra_token else -1)
    return positions, torch.stack([values[p] for p in positions]), assignment, m
