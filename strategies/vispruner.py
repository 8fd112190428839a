"""VisPruner: important tokens by [CLS] attention, then diverse tokens by duplicate removal.

Paper: Zhang et al., *Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs*, ICCV 2025 (arXiv 2412.01818). Authors' code: ``Theia-4869/VisPruner`` (commit
``aefa01a``, ``llava/model/llava_arch.py`` ``encode_images``, ``llava/model/multimodal_encoder/
clip_encoder.py`` ``feature_select``, ``llava/eval/model_vqa_loader.py`` for the default ratio).

The algorithm, as the authors run it on the vision tower's output (their defaults are ours):

1. **Split**: ``K_imp = int(K * important_ratio)`` important and ``K_div = K - K_imp`` diverse
   tokens (``int`` truncates, as in the authors' code).
2. **Important tokens**: the ``K_imp`` tokens of largest [CLS] attention (averaged over heads,
   exactly as the authors read it). The others form the residual list, in decreasing attention.
3. **Duplicate removal**, repeated while the residual list holds ``R > K_div`` tokens: with
   ``r = min(8, R - K_div)``, split the list into its even-indexed entries ``A`` and odd-indexed
   entries ``B``; score every token of ``A`` by its largest cosine similarity to any token of ``B``;
   drop the ``r`` tokens of ``A`` with the highest scores (all of ``A`` if it has fewer); the new
   list is the rest of ``A`` in decreasing score order followed by ``B`` in its order.
4. **Output**: the important and the remaining residual tokens, unchanged, in ascending position
   order; the other tokens are dropped (``assignment`` ``-1``).

``info["important"]`` ``[B, K]`` bool marks the output slots holding important tokens.

Departures from the authors' code: none in the algorithm (their similarity is on the same
features that are kept, and their attention is the head-averaged [CLS] row). Otherwise:

* **Precision.** ``compute_dtype="float32"`` (the default) computes the attention ranking and the cosines
  in float32 whatever the tokens' dtype; the authors compute them in the model's dtype (float16 in their
  evaluation: the head average, ``x / x.norm()``, the ``A B^T`` products and their maxima). Float32 is the
  default because the selection then depends on the tokens' values alone, not on the dtype they are
  stored in nor on a device's half-precision kernels (the same values in float16, bfloat16 or float32
  select the same tokens): in half precision the scores keep about three significant digits (float16; two
  in bfloat16), so many tie exactly, and a tie or a rounding step at a drop boundary changes that round's
  list and every round after it (on random inputs of LLaVA-1.5 shapes only about 35 of 64 kept tokens
  are the same as with the authors' float16 arithmetic, ``tests/test_compute_dtype.py``).
  ``compute_dtype="input"`` reproduces the authors' arithmetic in the tokens' dtype (float16 / bfloat16;
  float32 tokens compute as with the default).
* Ties in the attention and similarity rankings go to the lower position / earlier list entry (the
  authors' non-stable ``argsort`` leaves them unspecified); zero tokens are normalised with ``eps``
  (``F.normalize``), or stay zero with ``compute_dtype="input"``, instead of giving NaN.

Cost. The residual tokens are normalised once (not all ``N``), and a round needs only the cosines
between the tokens of ``A`` and of ``B``. Those never change (only the list does, and entries move
between ``A`` and ``B``), so with ``cache="auto"`` (default), when the ``R0 x R0`` cosine matrix of the
residual tokens holds at most :data:`_GRAM_FACTOR` times the tokens' ``N D`` elements, it is computed
once and every round reads its scores from it, a bounded block of rows at a time: ``O(N^2 D + N^3)``
in all instead of ``O(N^3 D)``, for ``R0^2`` more floats. Otherwise (long videos, few channels) every
round multiplies the gathered ``A`` and ``B`` tokens as before, in row chunks of :data:`_CHUNK`, each
computed in pieces of at most one row block of similarities; the complexity stays ``O(N^3 D)`` for
``N`` large against ``D``. With the default factor of 9, any residual list of at most ``9 D`` tokens is
cached (at ``D = 1024``: 16 frames of 576 tokens, ~8x the tokens' memory; recomputing took 5.9 times
as long at 8 frames on the performance page's machine); a 32-frame clip is recomputed.
``cache="always"`` caches whatever the size (faster at video scale if the memory is there) and
``"never"`` never does; they are the two regimes ``tokencomp bench`` times (:attr:`cost_regimes`).

Both give bit for bit the scores of the per-round products, so the rankings, near ties included,
are unchanged. This rests on how the CPU BLAS (MKL) behaves, observed and tested rather than
documented: a float32 GEMM gives every entry the same value whatever the shape of the product it is
part of, except products with fewer than :data:`~tokencomp.kernels.GEMM_MIN` rows or columns, which
it computes with another kernel that reads its operands in place. Those (the last rounds, and a last
chunk of fewer than 12 rows) are multiplied per round with exactly the shapes and memory layout they had before.
``test_cached_cosines_equal_per_round_products`` checks the equality on Gaussian tokens; another
BLAS (a GPU's) could differ in the last bit, which only matters for scores tied to that bit.
"""

from __future__ import annotations

from functools import partial

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import COMPUTE_DTYPE, Interval, Options
from tokencomp.kernels import (
    GEMM_MIN,
    batched_gather,
    divide_by_norm,
    gemm_pieces,
    half_precision,
    row_blocks,
    selection_result,
)
from tokencomp.kernels import blocks as _blocks
from tokencomp.kernels.attention import attention_scores, rank_descending
from tokencomp.kernels.blocks import unit_vectors
from tokencomp.kernels.gather import flat_index
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context

# Tokens the authors remove per round of duplicate removal (``min(8, R - K_div)``).
_PER_ROUND = 8
# Rows of the [B, chunk, R/2] similarity block computed at once (the authors' products are grouped so;
# a chunk larger than one row block of elements is computed in pieces of the same results).
_CHUNK = 2048
# With cache="auto", the cosines of the residual tokens are cached when their [B, R0, R0] matrix holds at
# most this many times the tokens' B * N * D elements (float32); above that, every round multiplies anew.
_GRAM_FACTOR = 9


def _unit_rows(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``F.normalize(tokens.float(), dim=-1)`` at ``positions`` ``[B, S]``: ``[B, S, D]`` float32, fresh.

    Row for row the same values (:func:`~tokencomp.kernels.blocks.unit_vectors`); float32 rows are
    normalised in place in the gathered copy, so neither all ``N`` tokens nor a second copy of the rows
    is made.
    """
    rows = batched_gather(tokens, positions)
    return unit_vectors(rows, out=rows if rows.dtype == torch.float32 else None)


def _slot_rows(tokens: torch.Tensor, residual: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Unit rows ``[B, S, D]`` of the residual list's ``slots`` ``[B, S]``, normalised from ``tokens``."""
    return _unit_rows(tokens, torch.gather(residual, 1, slots))


def _product_scores(rows_of, even: torch.Tensor, odd: torch.Tensor, rows: slice) -> torch.Tensor:
    """Largest cosine ``[B, S]`` of the ``A`` entries ``even[:, rows]`` to the ``B`` entries ``odd``.

    The authors' product: ``A`` and ``B`` gathered whole (``rows_of`` maps list slots ``[B, S]`` to
    fresh unit rows ``[B, S, D]``), then row chunks of :data:`_CHUNK` (``rows`` starts at a multiple of
    it), computed in pieces of at most one row block of similarities. Every product keeps the memory
    layout it has when all of ``A`` is multiplied at once, which small products are sensitive to
    (BLAS reads them in place).
    """
    b, tb = odd.shape
    b_rows = rows_of(odd).transpose(1, 2)
    a = rows_of(even)
    out = torch.empty(b, rows.stop - rows.start, dtype=a.dtype, device=a.device)
    for piece in gemm_pieces(rows, _CHUNK, row_blocks(b, rows.stop - rows.start, tb)[0].stop):
        out[:, piece.start - rows.start : piece.stop - rows.start] = (a[:, piece] @ b_rows).amax(dim=-1)
    return out


def _gram_scores(gram: torch.Tensor, rows_of, even: torch.Tensor, odd: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Largest cosine ``[B, |A|]`` of every ``A`` entry to the ``B`` entries, read from ``gram``.

    ``gram`` ``[B, R0, R0]`` holds the cosines of all residual slots. The ``A`` rows are copied into
    ``buf`` (``[B * rows * R0]``, allocated once) a block of ``rows`` at a time, the columns outside
    ``B`` set to ``-inf``, and the maximum taken. Rows that the per-round product would compute in a
    chunk of fewer than :data:`~tokencomp.kernels.GEMM_MIN` rows (the last chunk of ``A``) are multiplied as
    before.
    """
    b, r0, _ = gram.shape
    ta = even.shape[1]
    if _CHUNK < GEMM_MIN:  # every chunk is small: multiply them all
        tail = 0
    elif 0 < ta % _CHUNK < GEMM_MIN:  # the last chunk is small: multiply its rows
        tail = ta - ta % _CHUNK
    else:
        tail = ta
    out = torch.empty(b, ta, dtype=gram.dtype, device=gram.device)
    # 0 on the columns of B, -inf elsewhere (adding is several times faster than masked_fill_)
    bias = torch.full((b, 1, r0), float("-inf"), dtype=gram.dtype, device=gram.device)
    bias[:, 0].scatter_(1, odd, 0.0)
    flat = gram.view(b * r0, r0)
    for blk in row_blocks(b, tail, r0, buf.numel()):
        m = blk.stop - blk.start
        rows = torch.index_select(flat, 0, flat_index(even[:, blk], r0), out=buf[: b * m * r0].view(b * m, r0))
        out[:, blk] = rows.view(b, m, r0).add_(bias).amax(dim=-1)
    if tail < ta:
        out[:, tail:] = _product_scores(rows_of, even, odd, slice(tail, ta))
    return out


@register("vispruner")
class VisPruner(Compressor):
    """Keep the top [CLS]-attention tokens, then the most mutually distinct of the rest.

    Parameters
    ----------
    important_ratio : float, default 0.5
        Share of the budget given to important (attention-selected) tokens, in ``[0, 1]``:
        ``K_imp = int(K * important_ratio)``. The authors' default is 0.5 (their MME example uses
        0.75 at 64 tokens).
    cache : {"auto", "always", "never"}, default "auto"
        Whether the cosines of the residual tokens are computed once and kept (``R0^2`` floats) or
        every round of duplicate removal multiplies the tokens anew; ``"auto"`` keeps them while they
        hold at most 4x the tokens' elements (see the module notes). The result is the same.
        With ``compute_dtype="input"`` on half-precision tokens every round multiplies anew, as the
        authors' code.
    compute_dtype : {"float32", "input"}, default "float32"
        The precision of the head-averaged attention and the cosines: ``"float32"`` whatever the
        tokens' dtype, or ``"input"``, the tokens' own dtype when they are float16 / bfloat16 (the
        authors' arithmetic in a half-precision model: the attention row rounded to it, the tokens
        divided by their norms, the ``A B^T`` products and their maxima all in that dtype).
    """

    stage = "pre_llm"
    needs_attention = True
    text_conditioned = False
    deterministic = True
    requires = ("cls_attention",)
    summary = "Top [CLS]-attention tokens plus diverse tokens kept by iterative duplicate removal."
    complexity = "O(N^3 D)"
    scale_invariant = True
    info_layout = {"important": "row"}
    paper = (
        "Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning "
        "in VLMs (VisPruner), ICCV 2025"
    )

    cost_regimes = {"cached": {"cache": "always"}, "recomputed": {"cache": "never"}}

    parameter_constraints = {
        "important_ratio": (Interval(float, 0.0, 1.0),),
        "cache": (Options(("auto", "always", "never")),),
        "compute_dtype": (COMPUTE_DTYPE,),
    }

    def __init__(self, *, important_ratio: float = 0.5, cache: str = "auto", compute_dtype: str = "float32") -> None:
        self.important_ratio = important_ratio
        self.cache = cache
        self.compute_dtype = compute_dtype

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        b, n, d = tokens.shape
        half = half_precision(self.compute_dtype, tokens.dtype)
        attn = attention_scores(context, dtype=half)
        k_imp = int(k * self.important_ratio)
        k_div = k - k_imp

        # 2. Important tokens; the residual list in decreasing attention.
        order = rank_descending(attn)
        important, residual = order[:, :k_imp], order[:, k_imp:]

        # 3. Iterative duplicate removal among the residual tokens.
        if k_div > 0 and residual.shape[1] > k_div:
            residual = _remove_duplicates(tokens, residual, k_div, "never" if half else self.cache, half)

        selected = torch.cat([important, residual], dim=1) if k_div > 0 else important
        indices = selected.sort(dim=-1).values
        is_imp = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, important, True)
        return selection_result(tokens, indices, important=torch.gather(is_imp, 1, indices))


def _remove_duplicates(
    tokens: torch.Tensor, residual: torch.Tensor, k_div: int, cache: str, half: torch.dtype | None = None
) -> torch.Tensor:
    """Step 3 on the residual list ``[B, R0]`` (positions in ``tokens``): the ``[B, K_div]`` survivors in list order.

    With ``half`` (the tokens' dtype, for ``compute_dtype="input"``), the unit vectors and every product
    are computed in it (the authors' ``x / x.norm()`` and ``a @ b.T``), never cached.
    """
    b, r0 = residual.shape
    n, d = tokens.shape[1:]
    if half is None:
        unit = _unit_rows(tokens, residual)  # float32 unit vectors of the residual tokens, by list slot
    else:
        unit = divide_by_norm(batched_gather(tokens, residual))
    rows_of = partial(batched_gather, unit)  # list slots [B, S] -> unit rows [B, S, D]
    gram = buf = None
    fits = r0 * r0 <= _GRAM_FACTOR * n * d
    if r0 >= 2 * GEMM_MIN and (cache == "always" or (cache == "auto" and fits)):
        gram = torch.bmm(unit, unit.transpose(1, 2))  # [B, R0, R0] cosines of every pair of slots
        # the few rows still multiplied are normalised again from the tokens when needed
        rows_of = partial(_slot_rows, tokens, residual)
        del unit
        # rows of gram read at once: a quarter of a row block (as fast, and stays in cache), at most an
        # eighth of gram, at most all of A
        rows = min(max(1, min(_blocks.BLOCK_ELEMENTS // 4, gram.numel() // 8) // (b * r0)), (r0 + 1) // 2)
        buf = torch.empty(b * rows * r0, dtype=gram.dtype, device=gram.device)
    lst = torch.arange(r0, device=residual.device).expand(b, r0)  # the list, as slots
    while True:
        r = min(_PER_ROUND, lst.shape[1] - k_div)
        if r <= 0:
            break
        even, odd = lst[:, ::2], lst[:, 1::2]
        if gram is not None and odd.shape[1] >= GEMM_MIN:
            scores = _gram_scores(gram, rows_of, even, odd, buf)
        else:
            scores = _product_scores(rows_of, even, odd, slice(0, even.shape[1]))
        keep = rank_descending(scores)[:, r:]  # drop the r most duplicated, keep score order
        lst = torch.cat([torch.gather(even, 1, keep), odd], dim=1)
    return torch.gather(residual, 1, lst)
