"""A literal, loop-based re-statement of the ApET authors' stage-1 procedure, one image at a time.

Written from ``apet-reference.md`` (the authors' ``llava_arch.py`` / ``qwen2_5_vl_custom.py``), with
no vectorisation, so that the batched strategy can be compared against it. Farthest-point sampling is
not restated here: the authors' ``fps`` is :func:`tokencomp.analysis.authors_apet.authors_fps` (the speed
reference of ``tokencomp bench``), and :func:`literal_fps` calls it on one image.
"""

from __future__ import annotations

import torch

from tokencomp.analysis.authors_apet import authors_fps


def literal_fps(x: torch.Tensor, m: int, start: int) -> list[int]:
    """The authors' ``fps`` on one image ``x`` ``[N, D]`` from ``start``: the ``m`` picked positions."""
    return authors_fps(x.unsqueeze(0), m, torch.tensor([start]))[0].tolist()


def literal_apet(
    x: torch.Tensor,
    k: int,
    basis: list[int],
    *,
    ridge: float = 1e-5,
    injection: str = "replace",
    order: str = "position",
):
    """Return (positions, tokens) the authors' procedure outputs for one image ``x`` ``[N, D]``."""
    x = x.float()
    n = x.shape[0]
    m = len(basis)
    s = x[basis]
    g = s @ s.T + ridge * torch.eye(m)
    c = torch.linalg.solve(g, s @ x.T).T
    err = torch.linalg.norm(x - c @ s, dim=-1)
    topk = [int(i) for i in torch.topk(err, k).indices]  # descending error

    work = x.clone()
    if injection != "none":
        if order == "position":  # boolean-mask assignment: rows in ascending position order
            slots = sorted(topk[k - m :])
        else:  # index assignment in top-K order
            slots = topk[k - m :]
        for j, pos in enumerate(slots):
            work[pos] = s[j] if injection == "replace" else 0.5 * s[j] + 0.5 * x[pos]
    targets = topk[: k - m] if injection != "none" else topk
    dropped = [i for i in range(n) if i not in set(topk)]

    sums = {t: work[t].clone() for t in targets}
    counts = {t: 1 for t in targets}
    target_rows = x[targets]
    for i in dropped:
        sims = (target_rows @ x[i]) / (target_rows.norm(dim=-1) * x[i].norm())
        best = targets[int(torch.argmax(sims))]  # first maximum
        sums[best] += x[i]
        counts[best] += 1
    for t in targets:
        work[t] = sums[t] / counts[t]
    positions = sorted(topk)
    return positions, work[positions]
