"""LLaVA-PruMerge: IQR outliers of [CLS] attention, each absorbing its nearest neighbours.

Paper: Shang et al., *LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
Models*, arXiv 2403.15388 (2024). Authors' code: ``42Shawn/LLaVA-PruMerge`` (commit ``097c041``,
``llava/model/multimodal_encoder/clip_encoder.py``: ``outlier_dectection``,
``token_prune_merge_advanced`` (PruMerge) and ``token_prune_merge_advanced_plus`` (PruMerge+)).

The algorithm, as the authors run it on the vision tower's output (their defaults are ours):

1. **Outliers**: with ``Q1``, ``Q3`` the 25th / 75th percentiles of the image's [CLS] attention
   (linear interpolation, as ``numpy.percentile``), the outliers are the tokens with attention
   ``> Q3 + 1.5 (Q3 - Q1)``. From their count the authors keep ``m = int(N * (count / N))`` tokens
   (a float round trip, one less than the count for some counts at ``N = 729`` or ``196``); ``m`` is
   the adaptive budget of PruMerge.
2. **Centres** (``K_c = K - 1`` of them with ``extra_token``, else ``K``; see *Exact budget*).
3. **Merge**: every centre ``i`` finds its ``knn`` most cosine-similar tokens among *all* other
   tokens (other centres included, as the authors' loop does) and becomes
   ``x_i + sum_j a_j x_j``, where ``a_j`` is neighbour ``j``'s [CLS] attention. This is the
   authors' formula: the attention-weighted sum is not normalised (their ``/ torch.sum(weights)``
   is commented out) and is added to the unchanged centre.
4. **Extra token** (``extra_token=True``, the authors' code): one more output,
   ``sum_j a_j x_j`` over all non-centre tokens.
5. **Output** in the authors' order (``order="authors"``, default): the centres as their ``topk``
   lists them, by descending attention (PruMerge+: the outliers by descending attention, then the
   spatial samples by ascending position), the extra token last. ``order="position"`` puts every output
   in ascending original position instead.

*Exact budget.* PruMerge adapts the token count to the image (``m`` outliers; PruMerge+ adds about
``3 m`` spatially uniform tokens), whereas our API returns exactly ``K``. Our rule:

* ``plus=False``: the centres are the outliers ranked by attention, filled (or truncated) to
  ``K_c`` with the next highest-attention tokens, i.e. the ``K_c`` tokens of largest attention.
* ``plus=True``: the ``min(m, K_c)`` highest-attention outliers, then ``u = K_c - min(m, K_c)``
  tokens evenly spaced over the ``R = N - min(m, K_c)`` other positions in raster order: those of
  rank ``floor(j R / u)``, ``j = 0 .. u - 1`` (the authors take every ``int(int(N / m) / 3)``-th
  position from 0 and skip the outliers).

``info["num_outliers"]`` ``[B]`` gives ``m``, the number of tokens the authors would have kept.

Each output sits at a position of a token it represents: a centre at its own position, the extra
token at the position of the non-centre token of largest attention. ``assignment`` names one
representative per input token: its own slot for a centre; for another token the centre of largest
cosine similarity among those that took it as a neighbour, else the extra token (``-1`` without
it). A token can feed several centres (and the extra token); ``info["neighbours"]`` ``[B, K, knn]``
lists each output slot's neighbour positions (``-1`` for the extra token's row).

Departures from the authors' code:

* Similarity uses the tokens themselves: the authors compare the keys of the vision tower's last
  layer, which :class:`~tokencomp.Context` does not carry.
* ``Context.cls_attention`` is the attention averaged over heads; the authors recompute a
  single-head attention from the full-width query and key of the last layer
  (``softmax(q k^T / sqrt(C))``).
* The quartiles are per image; the authors' ``outlier_dectection`` pools every image of the batch
  (identical for their batch size of 1).
* The exact-``K`` rule above (the authors' count is adaptive), and PruMerge+'s uniform fill.
* ``knn`` neighbours need ``N > knn`` tokens; smaller inputs raise ``ValueError`` (the authors'
  ``topk`` fails there too). Ties in the attention and in the similarity rankings go to the lower
  position (stable sorts; the authors' ``topk`` leaves their order unspecified).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokencomp.base import Compressor
from tokencomp.constraints import OUTPUT_ORDER, Boolean, Interval
from tokencomp.errors import InputError
from tokencomp.kernels import batched_gather, row_blocks, rows_matmul, slots_of
from tokencomp.kernels.attention import attention_scores, rank_descending
from tokencomp.kernels.blocks import scaled_norms, unit_vectors
from tokencomp.kernels.gather import flat_index
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context


def iqr_outlier_count(attn: torch.Tensor) -> torch.Tensor:
    """Number ``[B]`` of entries of each row of ``attn`` ``[B, N]`` above ``Q3 + 1.5 IQR``."""
    q = torch.quantile(attn, torch.tensor([0.25, 0.75], dtype=attn.dtype, device=attn.device), dim=-1)
    upper = q[1] + 1.5 * (q[1] - q[0])
    return (attn > upper.unsqueeze(-1)).sum(dim=-1)


def authors_keep_count(count: torch.Tensor, n: int) -> torch.Tensor:
    """``int(n * (count / n))`` in float64, as the authors turn the outlier count into a ratio and back."""
    return torch.floor(count.double() / n * n).to(torch.int64)


@register("prumerge")
class PruMerge(Compressor):
    """Keep the [CLS]-attention outliers (PruMerge+: plus uniform samples), each merged with its neighbours.

    Parameters
    ----------
    plus : bool, default False
        PruMerge+: after the outliers, fill the centres with spatially evenly spaced tokens
        instead of the next highest-attention ones.
    knn : int, default 32
        Neighbours each centre absorbs (the authors' ``topk(..., k=32)``).
    extra_token : bool, default True
        Spend one output on the attention-weighted sum of all non-centre tokens, as the authors'
        code appends it.
    order : {"authors", "position"}, default "authors"
        The sequence the language model receives: the centres in the authors' order (by descending
        attention; PruMerge+: outliers so, then samples by position) and the extra token last; or
        every output by position.

    Notes
    -----
    See the module docstring for the exact-``K`` rule, the ``assignment`` rule and the departures
    from the authors' code. The outputs are not averages (``convex_outputs = False``): a centre is
    ``x_i + sum_j a_j x_j`` and the extra token ``sum_j a_j x_j``, the authors' unnormalised sums.
    """

    stage = "pre_llm"
    needs_attention = True
    text_conditioned = False
    deterministic = True
    requires = ("cls_attention",)
    convex_outputs = False  # x_i + sum_j a_j x_j, not an average (see Notes)
    summary = "IQR outliers of [CLS] attention, each merging its k nearest neighbours (PruMerge/PruMerge+)."
    complexity = "O(N K D)"
    scale_invariant = True
    info_layout = {"num_outliers": "row", "neighbours": "position"}
    paper = (
        "Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models, "
        "arXiv 2403.15388 (2024)"
    )

    parameter_constraints = {
        "plus": (Boolean(),),
        "knn": (Interval(int, 1),),
        "extra_token": (Boolean(),),
        "order": (OUTPUT_ORDER,),
    }

    def __init__(self, *, plus: bool = False, knn: int = 32, extra_token: bool = True, order: str = "authors") -> None:
        self.plus = plus
        self.knn = knn
        self.extra_token = extra_token
        self.order = order

    @property
    def output_order(self) -> str:  # type: ignore[override]
        """``"strategy"`` (centres by attention, the extra token last) with ``order="authors"``."""
        return "strategy" if self.order == "authors" else "position"

    def _check_budget(self, k: int, n: int, context: Context) -> None:
        centres = k - 1 if self.extra_token else k
        if centres > 0 and self.knn > n - 1:
            raise InputError(
                f"{self.display_name()}: knn={self.knn} neighbours per kept token need at least "
                f"knn + 1 = {self.knn + 1} "
                f"tokens; got N={n} (budget K={k}). Lower knn to at most {n - 1}."
            )

    def _centres(self, attn: torch.Tensor, kc: int, num_out: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` int64 sort keys: the ``kc`` centres of each row hold the smallest, in output order.

        Centres taken by attention have their attention rank (``< N``), PruMerge+'s samples ``N`` plus
        their position, the other tokens ``2 N`` plus their position; with ``order="position"`` every
        centre has its position.
        """
        b, n = attn.shape
        pos = torch.arange(n, device=attn.device).expand(b, n)
        rank = rank_descending(attn).argsort(dim=-1)  # attention rank of every position
        o = num_out.clamp(max=kc) if self.plus else torch.full((b,), kc, device=attn.device)  # by attention, [B]
        by_rank = rank < o.unsqueeze(-1)
        sel = by_rank | self._samples(by_rank, kc, o) if self.plus else by_rank
        key = torch.where(by_rank, rank, n + pos) if self.order == "authors" else pos
        return torch.where(sel, key, 2 * n + pos)

    @staticmethod
    def _samples(sel: torch.Tensor, kc: int, o: torch.Tensor) -> torch.Tensor:
        """PruMerge+'s ``kc - o`` evenly spaced tokens among the non-``sel`` positions, as a ``[B, N]`` mask."""
        b, n = sel.shape
        u = kc - o  # uniform fill, [B]
        r = n - o
        rest = torch.sort(sel.to(torch.int64), dim=-1, stable=True).indices  # non-outliers first, ascending
        j = torch.arange(kc, device=sel.device).unsqueeze(0)  # [1, kc]
        valid = j < u.unsqueeze(-1)
        pick = torch.where(valid, j * r.unsqueeze(-1) // u.clamp_min(1).unsqueeze(-1), torch.zeros_like(j))
        hits = torch.zeros(b, n, dtype=torch.int64, device=sel.device)
        hits.scatter_add_(1, torch.gather(rest, 1, pick), valid.to(torch.int64))
        return hits > 0

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        # Maths in float32; half-precision rows are read into float32 block by block, never copied whole.
        x = tokens.float() if tokens.dtype == torch.float64 else tokens
        b, n, d = x.shape
        dev = x.device
        attn = attention_scores(context)
        num_out = authors_keep_count(iqr_outlier_count(attn), n)
        kc = k - 1 if self.extra_token else k

        # 1.-2. Centres, in output order.
        key = self._centres(attn, kc, num_out)
        cpos = torch.sort(key, dim=-1).indices[:, :kc]  # [B, kc] (keys are distinct)
        sel = key < 2 * n

        # 3. Each centre absorbs its knn most similar other tokens, weighted by their attention. The
        # similarities one block of centres at a time: their [B, c, N] cosines (the unit centres times the
        # tokens, divided by the token norms: no normalised copy of the tokens); then the weighted sums of
        # the neighbours' rows, without a dense [B, K, N] weight matrix or a [B, K, knn, D] gather.
        norms, scale = scaled_norms(x)  # token n's norm is norms[n] / scale[n] (scale: a power of two)
        norms, scale = norms.clamp_min(1e-12).unsqueeze(1), scale.unsqueeze(1)  # [B, 1, N], F.normalize's floor
        nb_all = torch.empty(b, kc, self.knn, dtype=torch.int64, device=dev)
        sim_all = torch.empty(b, kc, self.knn, dtype=torch.float32, device=dev)
        for blk in row_blocks(b, kc, n):
            cp = cpos[:, blk]
            unit = unit_vectors(batched_gather(x, cp))
            sim = _times_tokens(unit, x).mul_(scale).div_(norms)  # [B, c, N]
            sim.scatter_(2, cp.unsqueeze(-1), float("-inf"))  # not itself
            nb = rank_descending(sim)[..., : self.knn]  # [B, c, knn], ties: the lower position
            val = torch.gather(sim, 2, nb)
            del sim
            nb_all[:, blk] = nb
            sim_all[:, blk] = val
        # x_i + sum_j a_j x_j as one weighted bag per centre: itself (weight 1), then its neighbours.
        values = torch.empty(b, k, d, dtype=torch.float32, device=dev)  # the centres, then the extra token
        if kc > 0:
            bags = torch.cat([cpos.unsqueeze(-1), nb_all], dim=2)  # [B, kc, 1 + knn]
            nb_attn = torch.gather(attn, 1, nb_all.view(b, -1)).view(b, kc, self.knn)
            weights = torch.cat([torch.ones(b, kc, 1, dtype=attn.dtype, device=dev), nb_attn], dim=2)
            values[:, :kc] = _bag_sums(x, bags, weights)
        positions = cpos
        neighbours = nb_all

        # 4. The extra token: attention-weighted sum of every non-centre token.
        if self.extra_token:
            rest_w = torch.where(sel, torch.zeros_like(attn), attn)
            values[:, kc:] = _weighted_sum(rest_w, x)  # [B, 1, D]
            extra_pos = rank_descending(torch.where(sel, torch.full_like(attn, float("-inf")), attn))[:, :1]
            positions = torch.cat([positions, extra_pos], dim=1)
            neighbours = torch.cat([neighbours, torch.full((b, 1, self.knn), -1, dtype=torch.int64, device=dev)], dim=1)

        # 5. Output in the authors' order (or by position); one representative slot per input token.
        if self.order == "position":
            indices, perm = positions.sort(dim=-1)
        else:
            indices, perm = positions, torch.arange(k, device=dev).expand(b, k)
        slot_of = perm.argsort(dim=-1)  # row of ``values`` -> output slot
        assignment = slots_of(indices, n)
        fallback = slot_of[:, kc:] if self.extra_token else torch.full((b, 1), -1, dtype=torch.int64, device=dev)
        rep = fallback.expand(b, n).clone()
        if kc > 0:
            flat_nb = nb_all.reshape(b, -1)
            flat_sim = sim_all.reshape(b, -1)
            best = torch.full((b, n), float("-inf"), dtype=torch.float32, device=dev)
            best.scatter_reduce_(1, flat_nb, flat_sim, reduce="amax")
            centre = torch.arange(kc, device=dev).repeat_interleave(self.knn).expand(b, -1)
            cand = torch.where(flat_sim == torch.gather(best, 1, flat_nb), centre, torch.full_like(centre, kc))
            owner = torch.full((b, n), kc, dtype=torch.int64, device=dev)
            owner.scatter_reduce_(1, flat_nb, cand, reduce="amin")
            owner_slot = torch.gather(slot_of, 1, owner.clamp(max=kc - 1))
            rep = torch.where(owner < kc, owner_slot, rep)
        assignment = torch.where(assignment >= 0, assignment, rep)
        return CompressionResult(
            tokens=batched_gather(values, perm),
            indices=indices,
            assignment=assignment,
            info={"num_outliers": num_out, "neighbours": batched_gather(neighbours, perm)},
        )


def _times_tokens(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x^T`` in float32: ``w`` ``[B, C, D]`` float32, ``x`` ``[B, N, D]`` tokens -> ``[B, C, N]``."""
    if x.dtype == torch.float32:
        return torch.bmm(w, x.transpose(1, 2))
    return rows_matmul(x, w.transpose(1, 2)).transpose(1, 2)


def _weighted_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, D]``: ``sum_j w[b, j] x[b, j]`` in float32 (half-precision rows read block by block)."""
    if x.dtype == torch.float32:
        return torch.bmm(w.unsqueeze(1), x)
    b, n, d = x.shape
    out = torch.zeros(b, 1, d, dtype=torch.float32, device=x.device)
    for blk in row_blocks(b, n, d):
        out += torch.bmm(w[:, None, blk], x[:, blk].float())
    return out


def _bag_sums(x: torch.Tensor, bags: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[B, K, D]`` float32: ``sum_t w[b, i, t] x[b, bags[b, i, t]]`` for bags of rows ``bags`` ``[B, K, M]``.

    One ``embedding_bag`` over the flattened tokens (weighted sums of rows, nothing gathered); for
    half-precision tokens, one bag member at a time into a float32 sum ([B, K, D] rows a step).
    """
    b, n, d = x.shape
    k, m = bags.shape[1], bags.shape[2]
    if x.dtype == torch.float32:
        flat = flat_index(bags.reshape(b, -1), n).view(b * k, m)
        out = F.embedding_bag(flat, x.reshape(b * n, d), per_sample_weights=w.reshape(b * k, m), mode="sum")
        return out.view(b, k, d)
    out = torch.zeros(b, k, d, dtype=torch.float32, device=x.device)
    for t in range(m):
        out.addcmul_(w[:, :, t : t + 1], batched_gather(x, bags[:, :, t]))
    return out
