"""A literal, loop-based re-statement of SparseVLM (``Gumpest/SparseVLMs``, tag ``v1.5``), one sample at a time.

Follows ``LlamaDynamicvitModel.forward`` (``modelling_sparse_llama.py``: raters, recycling),
``attn_postprocess_topk`` (``score.py``: scores and top-k) and ``cluster_and_merge`` (``utils.py``:
DPC-KNN), in plain Python loops over tokens. The changes, all stated in ``strategies/sparsevlm.py``:
the random ``1e-6`` density noise is replaced by the deterministic tie rule (equal densities: the
earlier candidate is the denser), ties in every top-k go to the higher-ranked candidate / lower position,
``raters_attention`` is our attention version of the rater rule, and the kept count comes from the output
count (``literal_split``) or, as theirs, from the stage's count (``literal_keep``). The merge keeps the
authors' ``count + 1e-6`` divisor.

``literal_prefill`` re-states their prefill loop over the pruning layers (``LlamaDynamicvitModel.forward``,
``modelling_sparse_llama.py`` at ``main`` ``26a5f48``, l.198-204 and l.214-320; the same at tag ``v1.5``
``b9619e6``, l.199-204 and l.267): the raters ``t_token_idx`` are chosen ONCE, before the first decoder
layer, and every pruning layer scores with those same text tokens (``attn_postprocess_topk(...,
t_token_idx, ...)``, l.259; ``score.py`` l.29-32), the kept count ``min(count, v_token_num - 1)``
(``score.py`` l.41).
"""

from __future__ import annotations

import math

import torch


def literal_raters_embeddings(v_t: torch.Tensor, t_t: torch.Tensor) -> list[int]:
    """``m_v_t = (v_t @ t_t^T).softmax(text).mean(visual)``; raters where ``m_v_t > m_v_t.mean()``."""
    m_v_t = (v_t.float() @ t_t.float().T).softmax(1).mean(0)
    idx = [t for t in range(m_v_t.shape[0]) if float(m_v_t[t]) > float(m_v_t.mean())]
    return idx if idx else list(range(m_v_t.shape[0]))


def raters_attention(attn: torch.Tensor) -> list[int]:
    """The same rule on the attention ``[T, N]``: each column normalised over the text tokens."""
    a = attn.float().tolist()
    t_num, n = len(a), len(a[0])
    col = [sum(a[s][j] for s in range(t_num)) for j in range(n)]
    m = []
    for t in range(t_num):
        total = 0.0
        for j in range(n):
            total += a[t][j] / col[j] if col[j] > 0 else 0.0
        m.append(total / n)
    mean = sum(m) / t_num
    idx = [t for t in range(t_num) if m[t] > mean]
    return idx if idx else list(range(t_num))


def clusters_of(pruned: int, ratio: float = 0.3, divisor: int = 10) -> int:
    """``merge_token_num_stage1 = int(P * 0.3) + 1``; ``cluster_num = int(that / 10) + 1`` (0 when P = 0)."""
    if pruned == 0:
        return 0
    num_stage1 = min(pruned, int(pruned * ratio) + 1)
    return min(num_stage1, int(num_stage1 / divisor) + 1)


def literal_split(n: int, k: int, ratio: float = 0.3, divisor: int = 10) -> int:
    """The largest top-k count whose output (kept + clusters) is ``k``, found by trying every count."""
    for keep in range(n, -1, -1):
        if keep + clusters_of(n - keep, ratio, divisor) == k:
            return keep
    raise ValueError("no split")


def literal_cluster_and_merge(x: torch.Tensor, cluster_num: int):
    """DPC-KNN of ``x`` ``[r, C]`` into ``cluster_num`` clusters: (merged ``[c, C]``, centres, idx_cluster)."""
    x = x.double()
    r, c_dim = x.shape
    rows = x.tolist()
    dist = [
        [math.sqrt(sum((p - q) ** 2 for p, q in zip(rows[i], rows[j]))) / c_dim**0.5 for j in range(r)]
        for i in range(r)
    ]
    # local density from the cluster_num nearest (itself included)
    density = []
    for i in range(r):
        nearest = sorted(dist[i])[:cluster_num]
        density.append(math.exp(-sum(d * d for d in nearest) / cluster_num))
    dist_max = max(max(row) for row in dist)
    # distance to the nearest denser token (ties: the earlier token is the denser)
    delta = []
    for i in range(r):
        best = dist_max
        for j in range(r):
            if density[j] > density[i] or (density[j] == density[i] and j < i):
                best = min(best, dist[i][j])
        delta.append(best)
    score = [delta[i] * density[i] for i in range(r)]
    index_down = sorted(range(r), key=lambda i: (-score[i], i))[:cluster_num]
    idx_cluster = []
    for i in range(r):
        best_c, best_d = None, None
        for ci, centre in enumerate(index_down):
            if best_d is None or dist[centre][i] < best_d:  # argmin: the first minimum
                best_c, best_d = ci, dist[centre][i]
        idx_cluster.append(best_c)
    for ci, centre in enumerate(index_down):
        idx_cluster[centre] = ci
    merged = []
    for ci in range(cluster_num):
        members = [i for i in range(r) if idx_cluster[i] == ci]
        weight = 1.0 / (len(members) + 1e-6)
        merged.append(sum((x[i] * weight for i in members), torch.zeros(c_dim, dtype=torch.float64)))
    return torch.stack(merged).float(), index_down, idx_cluster


def literal_sparsevlm_layer(x, attn, t_token_idx, keep, recycle=True, ratio=0.3, divisor=10):
    """One pruning layer on one sample: ``x`` ``[N, D]``, ``attn`` ``[T, N]``, raters ``t_token_idx``.

    Returns (positions, tokens, assignment): outputs by position, a merged token at its centre's.
    """
    x = x.float()
    n = x.shape[0]
    # attn_postprocess_topk: mean over the rater rows, top-k
    a = attn.float().tolist()
    relation_vis_text = [sum(a[t][j] for t in t_token_idx) / len(t_token_idx) for j in range(n)]
    order = sorted(range(n), key=lambda j: (-relation_vis_text[j], j))
    mask = [False] * n
    for j in order[:keep]:
        mask[j] = True
    values = {j: x[j].clone() for j in range(n) if mask[j]}
    owner = {j: j for j in range(n) if mask[j]}
    total_sparse_token_idx = [j for j in range(n) if not mask[j]]  # torch.where: ascending
    if recycle and total_sparse_token_idx:
        merge_token_stage1 = [relation_vis_text[j] for j in total_sparse_token_idx]
        merge_token_num_stage1 = min(len(total_sparse_token_idx), int(len(total_sparse_token_idx) * ratio) + 1)
        merge_token_stage2_idx = sorted(
            range(len(total_sparse_token_idx)), key=lambda i: (-merge_token_stage1[i], total_sparse_token_idx[i])
        )[:merge_token_num_stage1]
        stage2_pos = [total_sparse_token_idx[i] for i in merge_token_stage2_idx]
        cluster_num = min(merge_token_num_stage1, int(merge_token_num_stage1 / divisor) + 1)
        merged, centres, idx_cluster = literal_cluster_and_merge(torch.stack([x[p] for p in stage2_pos]), cluster_num)
        for ci, centre in enumerate(centres):
            values[stage2_pos[centre]] = merged[ci]
        for i, p in enumerate(stage2_pos):
            owner[p] = stage2_pos[centres[idx_cluster[i]]]
    positions = sorted(values)
    slot = {p: s for s, p in enumerate(positions)}
    assignment = [slot[owner[j]] if j in owner else -1 for j in range(n)]
    return positions, torch.stack([values[p] for p in positions]), assignment


def literal_keep(n: int, count: int) -> int:
    """``score.py`` l.41: ``torch.topk(relation_vis, min(sparse_token_list[layer], v_token_num - 1))``."""
    return min(count, n - 1)


def literal_clusters_after_keep(n: int, count: int) -> int:
    """``modelling_sparse_llama.py`` l.282 and l.286 (``main``): of the ``P = n - keep`` pruned tokens,
    ``merge_token_num_stage1 = int(P * 0.3) + 1`` are recycled into ``cluster_num = int(that / 10) + 1``."""
    pruned = n - literal_keep(n, count)
    if pruned == 0:  # the authors always prune one (v_token_num - 1); only n = 1 gets here
        return 0
    merge_token_num_stage1 = int(pruned * 0.3) + 1
    return int(merge_token_num_stage1 / 10) + 1


def literal_prefill(stages, counts, choose_raters, per_layer=False):
    """The authors' pruning layers on one sample, the raters chosen once and reused.

    ``stages``: per pruning layer ``(x, attn)``, the visual tokens ``[N_s, D]`` and the text-to-visual
    attention ``[T, N_s]`` there; ``counts``: the top-k count per layer; ``choose_raters``: the rater rule,
    a function of the first ``(x, attn)`` (theirs reads the LLM's input embeddings, l.200-204).
    ``per_layer=True`` is our option that re-chooses them at every layer from that layer's ``(x, attn)``
    (not the authors'). Returns per layer ``(t_token_idx, positions, tokens, assignment)``.
    """
    out = []
    t_token_idx = None
    for (x, attn), count in zip(stages, counts):
        if t_token_idx is None or per_layer:
            t_token_idx = choose_raters(x, attn)  # l.198-204: once, before the decoder loop
        keep = literal_keep(x.shape[0], count) if x.shape[0] > 1 else 1
        out.append((list(t_token_idx), *literal_sparsevlm_layer(x, attn, t_token_idx, keep)))
    return out
