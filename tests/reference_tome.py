"""A literal re-statement of ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` + ``merge_source`` for one
sample, repeated round by round until ``k`` tokens remain (the authors' code, with a stable sort).

Returns the tokens in the authors' final order with, for each, its size and the set of original tokens
it holds (the authors' ``source`` matrix, as sets).
"""

from __future__ import annotations

import torch


def literal_tome_round(x, size, sources, r, class_token=False):
    t = x.shape[0]
    protected = 1 if class_token else 0
    r = min(r, (t - protected) // 2)
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[::2], metric[1::2]
    scores = a @ b.t()
    if class_token:
        scores[0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(descending=True, stable=True)
    unm_idx = edge_idx[r:]
    src_idx = edge_idx[:r]
    dst_idx = node_idx[src_idx]
    if class_token:
        unm_idx = unm_idx.sort().values

    def merge(v, mode):
        src, dst = v[::2], v[1::2]
        unm = src[unm_idx]
        moved = src[src_idx]
        dst = dst.clone()
        for i in range(r):  # scatter_reduce, one by one
            j = int(dst_idx[i])
            dst[j] = dst[j] + moved[i] if mode == "sum" else torch.maximum(dst[j], moved[i])
        return torch.cat([unm, dst])

    new_x = merge(x * size, "sum")
    new_size = merge(size, "sum")
    src_sets, dst_sets = sources[::2], [set(s) for s in sources[1::2]]
    for i in range(r):
        dst_sets[int(dst_idx[i])] |= src_sets[int(src_idx[i])]
    new_sources = [src_sets[int(i)] for i in unm_idx] + dst_sets
    return new_x / new_size, new_size, new_sources


def literal_tome(x: torch.Tensor, k: int, class_token: bool = False):
    """``(tokens [k, D], sizes [k], sources: list of sets)`` in the authors' order after the last round."""
    x = x.float()
    size = torch.ones(x.shape[0], 1)
    sources = [{i} for i in range(x.shape[0])]
    protected = 1 if class_token else 0
    while x.shape[0] > k:
        t = x.shape[0]
        r = min(t - k, (t - protected) // 2)
        x, size, sources = literal_tome_round(x, size, sources, r, class_token)
    return x, size[:, 0], sources
