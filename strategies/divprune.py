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

The authors build the whole ``N x N`` matrix. We compute the same numbers without it, batched over ``B``:

- Step 2 needs, per column of the similarity ``S = x_hat x_hat^T``, its second-largest entry (the
  second-smallest distance is ``1 -`` it: ``1 - s`` is monotone, so the order statistics carry over
  exactly). ``S`` is symmetric, so only the tiles on and above its diagonal are computed (half the
  ``N^2 D`` work): a tile ``S[I, J]`` with the rows ``I`` above the columns ``J`` serves the columns
  ``J`` (reduced over its rows) and, as ``S[J, I]``, the columns ``I`` (reduced over its columns). A
  running top two per column merges the tiles. Tiles are at most ``chunk`` columns wide and
  :data:`~tokencomp.kernels.blocks.BLOCK_ELEMENTS` elements large (or one row of ``B chunk``), so the
  memory beyond the float32 normalised tokens is constant in ``N``.
- Step 3 keeps a running minimum distance per token, lowered at each pick by one row of distances:
  the products of all tokens with the pick (:func:`~tokencomp.kernels.matvec.token_dots`, ``O(B N D)``
  per pick, on the normalised tokens padded with zero rows whose distances are set to ``-inf``, into
  preallocated buffers). Those passes bound the time at video scale: they read all tokens once per
  pick, so their speed is that of memory.

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

from tokencomp.base import Compressor
from tokencomp.constraints import Interval
from tokencomp.kernels import selection_result
from tokencomp.kernels.blocks import row_blocks, unit_rows
from tokencomp.kernels.matvec import padded_rows, token_dots
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context


def _top2(tile: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest and second-largest entry of ``tile`` along ``dim`` (a repeated maximum is both; ``-inf``
    for the second when the dimension has one entry).

    One ``topk`` per tile and direction: a tournament of elementwise ``maximum`` / ``minimum`` is a few
    times cheaper on an idle machine, but its dozens of parallel operations per tile make it many times
    slower when the cores are shared.
    """
    if tile.shape[dim] == 1:
        first = tile.squeeze(dim)
        return first, torch.full_like(first, float("-inf"))
    top = tile.topk(2, dim=dim).values
    return top.select(dim, 0), top.select(dim, 1)


def _merge(top1: torch.Tensor, top2: torch.Tensor, cols: slice, new: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Fold the top two ``new`` of some more entries of the columns ``cols`` into the running top two."""
    a1, a2 = new
    b1, b2 = top1[:, cols], top2[:, cols]
    second = torch.maximum(torch.minimum(a1, b1), torch.maximum(a2, b2))
    top1[:, cols] = torch.maximum(a1, b1)
    top2[:, cols] = second


def _shift(blocks: list[slice], offset: int) -> list[slice]:
    return [slice(s.start + offset, s.stop + offset) for s in blocks]


def second_largest_similarity(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[B, N]``: the second-largest entry of every column of ``x x^T`` (its diagonal included).

    Only tiles on and above the diagonal are formed (see the module notes); each is at most ``chunk``
    columns wide and :data:`~tokencomp.kernels.blocks.BLOCK_ELEMENTS` elements large.
    """
    b, n, _ = x.shape
    top1 = torch.full((b, n), float("-inf"), dtype=x.dtype, device=x.device)
    top2 = top1.clone()
    for start in range(0, n, chunk):
        cols = slice(start, min(n, start + chunk))
        width = cols.stop - cols.start
        right = x[:, cols].transpose(1, 2)  # [B, D, c]
        # rows above the column block: both this block's columns and (by symmetry) the rows' own columns
        for rows in row_blocks(b, start, width):
            tile = torch.bmm(x[:, rows], right)  # [B, h, c]
            _merge(top1, top2, cols, _top2(tile, dim=1))
            _merge(top1, top2, rows, _top2(tile, dim=2))
            del tile  # before the next tile is allocated
        # the diagonal block: its own columns only
        for rows in _shift(row_blocks(b, width, width), start):
            _merge(top1, top2, cols, _top2(torch.bmm(x[:, rows], right), dim=1))
    return top2


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
    complexity = "O(N^2 D + N K D)"
    scale_invariant = True
    info_layout = {"order": "position"}
    paper = "Alvar et al., DivPrune, CVPR 2025 (arXiv 2503.02175)"

    parameter_constraints = {"chunk": (Interval(int, 1),)}

    def __init__(self, *, chunk: int = 1024) -> None:
        self.chunk = chunk

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        b, n, _ = tokens.shape
        padded = unit_rows(tokens, rows=padded_rows(n))  # [B, N', D] float32, zero rows after N
        x = padded[:, :n]
        rows = torch.arange(b, device=x.device)
        order = torch.empty(b, k, dtype=torch.int64, device=x.device)

        # Step 2: the second-smallest distance in each column of D = 1 - x x^T is 1 - the second-largest
        # similarity (with one token, its distance to itself).
        second = second_largest_similarity(x, self.chunk) if n > 1 else torch.ones(b, 1, device=x.device)
        pick = torch.sub(1.0, second).argmax(dim=1, keepdim=True)  # [B, 1]
        order[:, :1] = pick

        # Step 3: running minimum distance to the selected set; selected tokens (and the padding rows)
        # are out of the race.
        nearest = token_dots(padded, x[rows, pick[:, 0]], torch.empty(b, padded.shape[1], device=x.device))
        nearest.neg_().add_(1.0)  # 1 - x . x_pick
        nearest[:, n:] = float("-inf")
        nearest.scatter_(1, pick, float("-inf"))
        dist = torch.empty_like(nearest)
        for i in range(1, k):
            pick = nearest.argmax(dim=1, keepdim=True)
            order[:, i : i + 1] = pick
            token_dots(padded, x[rows, pick[:, 0]], dist)
            torch.minimum(nearest, dist.neg_().add_(1.0), out=nearest)
            nearest.scatter_(1, pick, float("-inf"))

        # Step 4: keep the picks in their original order.
        return selection_result(tokens, order.sort(dim=1).values, order=order)
