"""ToMe: bipartite soft matching, repeated until the budget, with size-weighted averages.

Paper: Bolya et al., *Token Merging: Your ViT But Faster*, ICLR 2023 (arXiv 2210.09461). Authors' code:
``facebookresearch/ToMe`` (``tome/merge.py``: ``bipartite_soft_matching``, ``merge_wavg``,
``merge_source``).

One round of the authors' procedure on ``t`` tokens, merging ``r`` of them:

1. The metric is L2-normalised; the tokens alternate into set ``A`` (even places) and ``B`` (odd places).
2. ``scores = A B^T``; every ``A`` token's best match in ``B`` (``max`` / ``argmax``). With
   ``protect_first`` (the authors' ``class_token``) the first token's row is ``-inf``: it never merges.
3. The ``A`` tokens sorted by their best score, descending: the first ``r`` merge into their match, the
   rest stay (with ``protect_first`` the staying ones are put back in their order).
4. Merging is size-weighted averaging (``merge_wavg``): ``x * size`` and ``size`` are summed into the
   match, then divided; sizes start at 1 and carry over rounds.
5. The new order is ``[staying A tokens..., B tokens...]``; the next round splits that order again.

"Repeated until the budget": each round merges ``r = min(t - k, (t - protected) // 2)`` (the authors'
cap on ``r``) until ``k`` tokens remain. A pre-LLM compressor has no attention keys, so the metric is
the current tokens themselves (the authors use the keys of the block's attention).

Departures: the ranking in step 3 is a stable sort (the authors' ``argsort`` leaves ties unspecified);
the output is re-ordered at the end to our convention (ascending ``indices``, where a token's index is
the original position of the token that represents it: the ``B`` token a group merged into, or an ``A``
token that stayed); the best-match search runs in row chunks (``chunk``) so that no full ``t/2 x t/2``
matrix is built for long videos (and a chunk too large for one row block of memory is computed in
pieces of the same results).

Cost: a round is one product of the ``A`` and ``B`` halves, ``O(t^2 D / 4)``; with ``r`` capped at
half the tokens there are ``log2(N / K)`` rounds, ``O(N^2 D)`` in all. A round's extra memory is the
normalised metric and one block of similarities, freed before the merge, then the merged tokens: the
size-weighted sums are formed in place in the output (no weighted copy of all tokens), and
half-precision tokens are read into float32 row block by row block (the maths run in float32, as
before).
"""

from __future__ import annotations

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import Boolean, Interval
from tokencomp.errors import InvalidParameterError
from tokencomp.kernels import batched_gather, gemm_pieces, row_blocks, unit_rows
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context


def best_match(a: torch.Tensor, b: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max and argmax of ``a b^T`` (``[B, ta, D]``, ``[B, tb, D]``), ``chunk`` rows at a time.

    A chunk whose ``[B, rows, tb]`` block would exceed one row block of elements (:func:`row_blocks`)
    is computed in smaller pieces, so the block stays bounded whatever ``chunk`` is.
    """
    bsz, ta, _ = a.shape
    tb = b.shape[1]
    values = torch.empty(bsz, ta, dtype=a.dtype, device=a.device)
    indices = torch.empty(bsz, ta, dtype=torch.int64, device=a.device)
    bt = b.transpose(1, 2)
    limit = row_blocks(bsz, max(ta, 1), tb)[0].stop  # rows of one bounded block
    for blk in gemm_pieces(slice(0, ta), chunk, limit):
        v, i = (a[:, blk] @ bt).max(dim=-1)
        values[:, blk] = v
        indices[:, blk] = i
    return values, indices


@register("tome")
class ToMe(Compressor):
    """Merge the most similar tokens pairwise (bipartite soft matching) until ``k`` remain.

    Parameters
    ----------
    protect_first : bool, default False
        Never merge the first token (the authors' ``class_token``, for a [CLS] token in front).
    chunk : int, default 2048
        Rows of the similarity block computed at once (memory only; the result does not depend on it).

    Notes
    -----
    ``info["size"]`` ``[B, K]`` is the number of input tokens each output token stands for.
    """

    stage = "pre_llm"
    needs_attention = False
    text_conditioned = False
    deterministic = True
    summary = "Bipartite soft matching repeated until the budget; size-weighted averages (ToMe)."
    complexity = "O(N^2 D)"
    scale_invariant = True
    info_layout = {"size": "row"}
    paper = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023 (arXiv 2210.09461)"

    parameter_constraints = {"protect_first": (Boolean(),), "chunk": (Interval(int, 1),)}

    def __init__(self, *, protect_first: bool = False, chunk: int = 2048) -> None:
        self.protect_first = protect_first
        self.chunk = chunk

    def _check_budget(self, k: int, n: int, context: Context) -> None:
        if self.protect_first and k < min(n, 2):
            raise InvalidParameterError(
                f"{self.display_name()}: with protect_first=True the first token never merges "
                "and the last pair needs a partner, "
                f"so the budget must be at least 2 (N={n}); got K={k}. Raise the budget or set protect_first=False."
            )

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        # The maths run in float32 (as the authors' code on float32 features); half tokens are only
        # read in row blocks or gathered rows, and the first round's output is float32.
        x = tokens if tokens.dtype in (torch.float16, torch.bfloat16, torch.float32) else tokens.float()
        b, n, d = x.shape
        size = torch.ones(b, n, 1, device=x.device)
        rep = torch.arange(n, device=x.device).expand(b, n)  # original position representing each token
        owner = rep.clone()  # current slot of every original token
        protected = 1 if self.protect_first else 0
        t = n
        while t > k:
            r = min(t - k, (t - protected) // 2)
            x, size, rep, owner = self._round(x, size, rep, owner, r)
            t -= r
        # our convention: outputs by ascending representative position
        order = rep.argsort(dim=1)
        slot = order.argsort(dim=1)  # current slot -> output slot
        return CompressionResult(
            tokens=batched_gather(x, order),
            indices=rep.gather(1, order),
            assignment=slot.gather(1, owner),
            info={"size": size.squeeze(-1).gather(1, order)},
        )

    def _round(self, x, size, rep, owner, r):
        b, t, d = x.shape
        rows = torch.arange(b, device=x.device)[:, None]
        metric = unit_rows(x)
        node_max, node_idx = best_match(metric[:, ::2], metric[:, 1::2], self.chunk)
        del metric  # free it before the merge allocates
        if self.protect_first:
            node_max[:, 0] = float("-inf")
        edge = node_max.argsort(dim=1, descending=True, stable=True)
        unm, src = edge[:, r:], edge[:, :r]
        if self.protect_first:
            unm = unm.sort(dim=1).values
        dst = node_idx.gather(1, src)  # [B, r] indices into B
        ta, tb = (t + 1) // 2, t // 2
        keep_a = ta - r
        # size-weighted sums (merge_wavg), formed in the output: [stayers' x * size, B's x * size], the
        # merged A tokens' x * size added into their matches in src order, then divided by the sizes
        sa, sb = size[:, ::2], size[:, 1::2]
        new_size = torch.empty(b, keep_a + tb, 1, device=x.device)
        new_size[:, :keep_a] = sa.gather(1, unm[..., None])
        new_size[:, keep_a:] = sb
        new_size[:, keep_a:].scatter_add_(1, dst[..., None], sa.gather(1, src[..., None]))
        new_x = torch.empty(b, keep_a + tb, d, device=x.device)
        torch.mul(batched_gather(x, 2 * unm).float(), new_size[:, :keep_a], out=new_x[:, :keep_a])
        torch.mul(x[:, 1::2].float(), sb, out=new_x[:, keep_a:])
        moved_in = batched_gather(x, 2 * src).float().mul_(sa.gather(1, src[..., None]))
        new_x[:, keep_a:].scatter_add_(1, dst[..., None].expand(-1, -1, d), moved_in)
        del moved_in
        new_x.div_(new_size)
        new_rep = torch.cat([rep[:, ::2].gather(1, unm), rep[:, 1::2]], dim=1)
        # where every current token goes: A tokens that stay -> their place among the stayers; merged A
        # tokens -> their match's place; B tokens -> after the stayers
        moved = torch.empty(b, t, dtype=torch.int64, device=x.device)
        a_slots = torch.empty(b, ta, dtype=torch.int64, device=x.device)
        a_slots[rows, unm] = torch.arange(keep_a, device=x.device).expand(b, keep_a)
        a_slots[rows, src] = keep_a + dst
        moved[:, ::2] = a_slots
        moved[:, 1::2] = keep_a + torch.arange(tb, device=x.device).expand(b, tb)
        return new_x, new_size, new_rep, moved.gather(1, owner)
