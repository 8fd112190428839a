"""DivPrune: keep a maximally diverse subset, by greedy max-min cosine distance.

Paper: Alvar et al., *DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models*,
CVPR 2025 (arXiv 2503.02175). Authors' code: ``vbdi/divprune`` (``DivPrune`` and
``pairwise_cosine_similarity`` in their LLaVA ``llava_arch.py``), applied to the projected image
features before the language model.

The algorithm (a greedy solution of the Max-Min Diversity Problem):

1. Cosine distance between every pair of tokens: ``D = 1 - x_hat x_hat^T`` with ``x_hat = x / |x|``.
2. First pick: the token whose **nearest other token is farthest**. The authors take, in every column of
   ``D``, the second-smallest entry (``topk(2, largest=False).values[1]``: the smallest is the token's
   zero distance to itself) and the ``argmax`` over the columns.
3. Every further pick: the token whose minimum distance to the already selected set is largest
   (``argmax_j min_{s in S} D[s, j]``), until ``k`` are selected.
4. The selected positions are sorted, and the tokens there kept unchanged; the rest are dropped
   (no merging).

The authors build the whole ``N x N`` matrix. We compute the same numbers without it: step 2 takes the
second-smallest distance column block by column block (``chunk`` columns at a time, memory
``O(B N chunk)``), and step 3 keeps a running minimum distance per token, lowered at each pick by one
row of distances (``O(B N D)`` per pick, ``O(B N)`` memory). Both are batched over ``B``.

Departures, each invisible except where stated:

- Maths in float32 (the authors run in the model's dtype, fp16 for LLaVA).
- A selected token is never picked again. In the authors' loop a selected token's own score is its
  self-distance (about 0), so it could be re-picked only if every remaining token duplicated a selected
  one; there they would return a repeated index and fewer distinct tokens, we take the next distinct
  one.
- A zero token (no direction) is at cosine distance 1 from everything (``F.normalize``); the authors'
  division by a zero norm gives NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokencomp.base import Compressor
from tokencomp.kernels import selection_result
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context
from tokencomp.validation import check_int


@register("divprune")
class DivPrune(Compressor):
    """Keep the ``k`` tokens picked greedily to maximise the minimum cosine distance among them.

    Parameters
    ----------
    chunk : int, default 1024
        Columns of the distance matrix computed at once for the first pick (memory bound only; the
        result does not depend on it).

    Notes
    -----
    ``info["order"]`` ``[B, K]`` holds the positions in the order they were picked (its first entry is
    the authors' first pick); ``indices`` is the same set sorted.
    """

    stage = "pre_llm"
    needs_attention = False
    text_conditioned = False
    deterministic = True
    summary = "Greedy max-min diversity on cosine distance (first pick: farthest nearest neighbour)."
    paper = "Alvar et al., DivPrune, CVPR 2025 (arXiv 2503.02175)"

    def __init__(self, *, chunk: int = 1024) -> None:
        self.chunk = check_int("divprune", "chunk", chunk, low=1)

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        x = F.normalize(tokens.float(), dim=-1)  # [B, N, D]
        b, n, _ = x.shape
        rows = torch.arange(b, device=x.device)
        order = torch.empty(b, k, dtype=torch.int64, device=x.device)

        # Step 2: the second-smallest distance in each column of D = 1 - x x^T, column block by block.
        second = torch.empty(b, n, device=x.device)
        for start in range(0, n, self.chunk):
            block = 1.0 - x @ x[:, start : start + self.chunk].transpose(1, 2)  # [B, N, c]
            if n > 1:
                second[:, start : start + self.chunk] = block.topk(2, dim=1, largest=False).values[:, 1]
            else:
                second[:, start : start + self.chunk] = block[:, 0]
        order[:, 0] = second.argmax(dim=1)

        # Step 3: running minimum distance to the selected set; selected tokens are out of the race.
        pick = order[:, 0]
        nearest = 1.0 - torch.einsum("bnd,bd->bn", x, x[rows, pick])
        nearest[rows, pick] = float("-inf")
        for i in range(1, k):
            pick = nearest.argmax(dim=1)
            order[:, i] = pick
            nearest = torch.minimum(nearest, 1.0 - torch.einsum("bnd,bd->bn", x, x[rows, pick]))
            nearest[rows, pick] = float("-inf")

        # Step 4: keep the picks in their original order.
        return selection_result(tokens, order.sort(dim=1).values, order=order)
