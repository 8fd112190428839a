"""A literal, loop-based re-statement of VisPruner (``Theia-4869/VisPruner``,
``llava/model/llava_arch.py`` ``encode_images``), one image at a time."""

from __future__ import annotations

import torch


def literal_vispruner(x: torch.Tensor, attn: torch.Tensor, k: int, important_ratio: float = 0.5) -> list[int]:
    """Return the kept positions (ascending) for one image ``x`` ``[N, D]`` with attention ``[N]``."""
    x = x.float()
    n = x.shape[0]
    a = [float(v) for v in attn]
    k_imp = int(k * important_ratio)
    k_div = k - k_imp
    order = sorted(range(n), key=lambda i: (-a[i], i))
    important, residual = order[:k_imp], order[k_imp:]
    unit = x / x.norm(dim=-1, keepdim=True)
    sim = unit @ unit.T  # cosine of every pair, looked up below
    while k_div > 0:
        big_r = len(residual)
        r = min(8, big_r - k_div)
        if r <= 0:
            break
        even, odd = residual[0::2], residual[1::2]
        scores = [float(sim[i, odd].max()) for i in even]  # largest cosine to any token of B
        ranked = sorted(range(len(even)), key=lambda t: (-scores[t], t))
        residual = [even[t] for t in ranked[r:]] + odd
    selected = important + residual if k_div > 0 else important
    return sorted(selected)
