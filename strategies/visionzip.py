"""VisionZip: dominant tokens by [CLS] attention plus merged contextual tokens.

Paper: Yang et al., *VisionZip: Longer is Better but Not Necessary in Vision Language Models*,
CVPR 2025, arXiv 2412.04467. Authors' code: ``dvlab-research/VisionZip`` (commit ``3151f6d``,
``visionzip/clip_encoder.py`` for the algorithm, ``visionzip/main.py`` and ``README.md`` for the
settings, ``visionzip/utils.py`` for the keys used as similarity metric).

The algorithm, as the authors run it on the vision tower's output (their defaults are ours):

1. **Budget split**: of the ``K`` output tokens, ``C = contextual`` are contextual and
   ``K - C`` dominant. The authors' settings are 54 + 10 (``K = 64``), 108 + 20 (128) and 162 + 30
   (192): ``C = K * 10 / 64``. With ``contextual=None`` we use that rule for every ``K``, rounded
   half up: ``C = floor(5 K / 32 + 1/2)``.
2. **Dominant tokens**: the ``K - C`` tokens of largest [CLS] attention (their code sums the heads,
   ours averages them: the same ranking), kept unchanged.
3. **Targets**: the ``M = N - (K - C)`` remaining tokens, in ascending position order; with
   ``step = max(1, M // C)`` the targets are those of rank ``0, step, 2 step, ...`` (the first
   ``C`` of them).
4. **Assignment**: every other remaining token goes to the target of largest cosine similarity
   (dot product of L2-normalised vectors; the first maximum on ties).
5. **Merge**: each contextual token is ``target + mean(assigned tokens)`` (the authors' code adds
   the mean of the assigned tokens to the target, ``target`` alone when nothing is assigned);
   ``contextual_merge="mean"`` gives the plain average ``(target + sum) / (1 + count)`` instead.
6. **Output** in the authors' order (``order="authors"``, default): the dominant tokens in ascending
   position, then the contextual tokens in ascending target position, as their
   ``torch.cat([dominant_tokens, contextual_tokens])``; a contextual token sits at its target's
   position. ``order="position"`` interleaves them in ascending original position instead.

Departures from the authors' code:

* Similarity uses the tokens themselves: the authors compare the keys of the vision tower's
  penultimate layer (averaged over heads), which :class:`~tokencomp.Context` does not carry.
* The authors keep the [CLS] token as one of the dominant tokens (``dominant=54`` is 53 patches +
  [CLS]); our tokens are the patch tokens only, so all ``K - C`` dominant slots hold patch tokens.
* ``C = 0`` (the default rule for ``K <= 3``, or ``contextual=0``) keeps ``K`` dominant tokens and
  drops the rest; the authors' code divides by zero there.
* Ties in the attention ranking go to the lower position (``torch.topk`` leaves them unspecified);
  a zero similarity vector is normalised with ``eps`` (``F.normalize``), or stays zero with
  ``compute_dtype="input"``, instead of giving NaN.
* Precision: ``compute_dtype="float32"`` (the default) ranks, matches and merges in float32 whatever the
  tokens' dtype; the authors do it all in the model's dtype (float16 in their evaluation): the sum of the
  heads' attention, ``x / x.norm()``, the similarity product, the merge's ``bmm`` and division and the
  ``target +`` addition. Float32 is the default because the selection and the assignment then depend on the
  tokens' values alone, not on the dtype they are stored in nor on a device's half-precision kernels (the
  same values in float16, bfloat16 or float32 give the same result): in half precision the scores keep about
  three significant digits (float16; two in bfloat16), so many tie exactly, and a tie or a rounding step
  moves a token to another target or across the dominant cut. ``compute_dtype="input"`` reproduces the
  authors' arithmetic in the tokens' dtype (float16 / bfloat16; float32 tokens compute as with the default):
  the head-averaged attention rounded to it (the same ranking as their half-precision sum over a
  power-of-two number of heads, e.g. CLIP-L's 16), the normalisation, similarities and arg max in it; the
  sums of the assigned tokens and their counts accumulate in float32 and are rounded once to it (what a
  half-precision ``bmm`` / ``sum`` on a GPU does), then divided and added in it. Where that rounded sum
  overflows (float16 tokens of size ~1e3), the authors' code gives ``inf``; ours divides in float32 there.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import COMPUTE_DTYPE, OUTPUT_ORDER, Interval, IsNone, Options
from tokencomp.errors import InputError
from tokencomp.kernels import (
    batched_gather,
    cosine_match,
    divide_by_norm,
    half_precision,
    merge_rows,
    row_blocks,
    selection_result,
    slots_of,
)
from tokencomp.kernels.attention import attention_scores, rank_descending
from tokencomp.kernels.gather import flat_index
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context

CONTEXTUAL_MERGES = ("target_plus_mean", "mean")


def default_contextual(k: int) -> int:
    """The authors' share of contextual tokens, ``K * 10 / 64`` rounded half up (10 of 64, 20 of 128)."""
    return (5 * k + 16) // 32


@register("visionzip")
class VisionZip(Compressor):
    """Keep the tokens of largest [CLS] attention; merge the rest into a few contextual tokens.

    Parameters
    ----------
    contextual : int or None, default None
        Number ``C`` of contextual (merged) tokens within the budget; the other ``K - C`` are the
        dominant tokens. ``None`` follows the authors' settings (10 of 64, 20 of 128, 30 of 192):
        ``C = floor(5 K / 32 + 1/2)``. Must not exceed the budget.
    contextual_merge : {"target_plus_mean", "mean"}, default "target_plus_mean"
        How a contextual token is formed from its target and the tokens assigned to it: the
        target plus the mean of the assigned tokens (the authors' code), or the plain mean of the
        target and the assigned tokens.
    order : {"authors", "position"}, default "authors"
        The sequence the language model receives: every dominant token (by position) before every
        contextual token (by position), as the authors' code; or all of them by position.
    compute_dtype : {"float32", "input"}, default "float32"
        The precision of the dominant ranking, the matching and the merge: ``"float32"`` whatever the
        tokens' dtype, or ``"input"``, the tokens' own dtype when they are float16 / bfloat16 (the
        authors' arithmetic in a half-precision model; see the departures).

    Notes
    -----
    ``info["dominant"]`` ``[B, K]`` bool marks the output slots holding dominant tokens. Every
    input token is represented (``assignment`` has no ``-1``) unless ``C = 0``.
    """

    stage = "pre_llm"
    needs_attention = True
    text_conditioned = False
    deterministic = True
    requires = ("cls_attention",)
    summary = "Top [CLS]-attention tokens plus contextual tokens merged by similarity."
    complexity = "O(N log N + (N - K) K D)"
    scale_invariant = True
    info_layout = {"dominant": "row"}
    paper = (
        "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, "
        "CVPR 2025 (arXiv 2412.04467)"
    )

    parameter_constraints = {
        "contextual": (IsNone(), Interval(int, 0)),
        "contextual_merge": (Options(CONTEXTUAL_MERGES),),
        "order": (OUTPUT_ORDER,),
        "compute_dtype": (COMPUTE_DTYPE,),
    }

    def __init__(
        self,
        *,
        contextual: Optional[int] = None,
        contextual_merge: str = "target_plus_mean",
        order: str = "authors",
        compute_dtype: str = "float32",
    ) -> None:
        self.contextual = contextual
        self.contextual_merge = contextual_merge
        self.order = order
        self.compute_dtype = compute_dtype

    @property
    def output_order(self) -> str:  # type: ignore[override]
        """``"strategy"`` (dominant, then contextual) with ``order="authors"``, else ``"position"``."""
        return "strategy" if self.order == "authors" else "position"

    @property
    def convex_outputs(self) -> bool:
        """Whether every output is an average of input tokens: only with ``contextual_merge="mean"``
        (``target + mean`` is not an average)."""
        return self.contextual_merge == "mean"

    def _contextual_count(self, k: int) -> int:
        return default_contextual(k) if self.contextual is None else self.contextual

    def _check_budget(self, k: int, n: int, context: Context) -> None:
        if self.contextual is not None and self.contextual > k:
            raise InputError(
                f"{self.display_name()}: contextual={self.contextual} contextual tokens do not fit "
                f"in the budget K={k}; "
                f"contextual must be in [0, K] = [0, {k}]. Raise the budget, lower contextual, or pass "
                "contextual=None for the authors' split."
            )

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        b, n, d = tokens.shape
        dev = tokens.device
        half = half_precision(self.compute_dtype, tokens.dtype)
        attn = attention_scores(context, dtype=half)
        c = self._contextual_count(k)
        dom = k - c

        # 2. Dominant tokens: the top K - C by [CLS] attention.
        top = rank_descending(attn)[:, :dom]
        dom_pos = top.sort(dim=-1).values
        if c == 0:
            return selection_result(tokens, dom_pos, dominant=torch.ones(b, k, dtype=torch.bool, device=dev))
        is_dom = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, top, True)
        m = n - dom
        # remaining positions in ascending order: a stable sort puts the non-dominant ones first
        rem = torch.sort(is_dom.to(torch.int64), dim=-1, stable=True).indices[:, :m]

        # 3. Evenly spaced targets among the remaining tokens: ranks 0, step, ..., exactly C of them
        # (m >= C, so step * C <= m), and the M - C others in ascending rank, without a host sync.
        step = max(1, m // c)
        ranks = torch.arange(0, step * c, step, device=dev)
        is_target = torch.zeros(m, dtype=torch.bool, device=dev)
        is_target[ranks] = True
        other_ranks = torch.sort(is_target.to(torch.int64), stable=True).indices[: m - c]
        tgt_pos = rem[:, ranks]  # [B, C], ascending
        oth_pos = rem[:, other_ranks]  # [B, M - C], ascending
        # maths in float32, or the tokens' half precision (rows read as needed)
        tgt = batched_gather(tokens, tgt_pos).to(torch.float32 if half is None else half)

        # 4.-5. Assign every other remaining token to its most similar target and merge, one block of
        # the M - C others at a time (they are ~88 % of the tokens: never gathered whole).
        if half is not None:
            ctx, match = _merge_in_half(tokens, tgt, oth_pos, self.contextual_merge)
        elif self.contextual_merge == "mean":
            ctx, match = merge_rows(tgt, tokens, oth_pos)
        else:
            sums = torch.zeros_like(tgt)
            match = torch.empty(b, m - c, dtype=torch.int64, device=dev)
            for blk in row_blocks(b, m - c, max(d, c)):
                src = batched_gather(tokens, oth_pos[:, blk]).to(tgt.dtype)
                best = cosine_match(src, tgt)
                match[:, blk] = best
                sums.view(b * c, d).index_add_(0, flat_index(best, c), src.reshape(-1, d))
            counts = torch.zeros(b, c, dtype=tgt.dtype, device=dev)
            counts.scatter_add_(1, match, torch.ones(match.shape, dtype=tgt.dtype, device=dev))
            ctx = tgt + sums / counts.clamp_min(1).unsqueeze(-1)

        # 6. Output: dominant then contextual (the authors'), or by position; each row copied straight
        # into its output slot.
        positions = torch.cat([dom_pos, tgt_pos], dim=1)
        if self.order == "position":
            indices, perm = positions.sort(dim=-1)
        else:
            indices, perm = positions, torch.arange(k, device=dev).expand(b, k)
        assignment = slots_of(indices, n)
        slot_of = perm.argsort(dim=-1)  # position in ``positions`` -> output slot
        assignment.scatter_(1, oth_pos, torch.gather(slot_of[:, dom:], 1, match))
        out = torch.empty(b, k, d, dtype=tgt.dtype, device=dev)
        flat = out.view(b * k, d)
        flat.index_copy_(0, flat_index(slot_of[:, :dom], k), batched_gather(tokens, dom_pos).to(tgt.dtype).view(-1, d))
        flat.index_copy_(0, flat_index(slot_of[:, dom:], k), ctx.reshape(-1, d))
        return CompressionResult(
            tokens=out,
            indices=indices,
            assignment=assignment,
            info={"dominant": perm < dom},
        )


def _merge_in_half(
    tokens: torch.Tensor, tgt: torch.Tensor, oth_pos: torch.Tensor, merge: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 4.-5. in the half-precision dtype of ``tokens`` and the targets ``tgt`` ``[B, C, D]``.

    The authors' arithmetic in a half-precision model: ``x / x.norm()`` of the targets and of the other
    remaining tokens (``oth_pos`` ``[B, M - C]``), their product and its ``argmax`` (the first maximum),
    all in that dtype; the sums of the assigned tokens and the counts accumulate in float32 and are rounded
    once to it, then the mean and ``target + mean`` (or ``contextual_merge="mean"``'s division) are taken
    in it. One block of the other tokens at a time, as the float32 path. Returns the contextual tokens
    ``[B, C, D]`` and the match ``[B, M - C]``.
    """
    b, c, d = tgt.shape
    dt = tgt.dtype
    unit = divide_by_norm(tgt).transpose(1, 2)
    sums = torch.zeros(b, c, d, dtype=torch.float32, device=tgt.device)
    match = torch.empty(oth_pos.shape, dtype=torch.int64, device=tgt.device)
    for blk in row_blocks(b, oth_pos.shape[1], max(d, c)):
        src = batched_gather(tokens, oth_pos[:, blk])
        best = torch.bmm(divide_by_norm(src), unit).argmax(dim=-1)
        match[:, blk] = best
        sums.view(b * c, d).index_add_(0, flat_index(best, c), src.reshape(-1, d).float())
    counts = torch.zeros(b, c, dtype=torch.float32, device=tgt.device)
    counts.scatter_add_(1, match, torch.ones(match.shape, dtype=torch.float32, device=tgt.device))
    if merge == "mean":
        return _half_mean(sums + tgt.float(), counts + 1, dt), match
    return tgt + _half_mean(sums, counts.clamp_min(1), dt), match


def _half_mean(sums: torch.Tensor, counts: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``sums.to(dt) / counts.to(dt)`` (float32 ``[B, C, D]`` and ``[B, C]``): the authors' half-precision mean.

    Where the rounded sum overflows ``dt`` (float16 tokens of size ~1e3 summed over dozens of tokens), the
    authors' code gives ``inf``; there the mean is divided in float32 and rounded once instead.
    """
    mean = sums.to(dt) / counts.to(dt).unsqueeze(-1)
    return torch.where(torch.isfinite(mean), mean, (sums / counts.unsqueeze(-1)).to(dt))
