"""SparseVLM: text raters score the visual tokens inside the LLM; pruned tokens are recycled by clustering.

Paper: Zhang et al., *SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference*, ICML 2025 (arXiv 2410.04417). Authors' code: ``Gumpest/SparseVLMs``, the ICML release
(tag ``v1.5``, commit ``b9619e6``; the same algorithm is ``USE_VERSION=1_0``, the default, on ``main``
``26a5f48``, which adds the 96-token setting):

* ``llava/model/language_model/modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``: the text
  raters, the pruning layers ``pruning_loc = [2, 6, 15]`` and the recycling;
* ``llava/model/language_model/score.py``, ``attn_postprocess_topk``: the scores and the per-layer counts
  ``sparse_token_dict``;
* ``llava/model/language_model/utils.py``, ``cluster_and_merge``: the density-peak clustering;
* ``LlamaDynamicvitFlashAttention2.forward`` (same file as the first): the attention the scores read,
  ``softmax(q k^T / sqrt(Dh))`` with the causal mask over the whole prompt.

The algorithm, at prefill (the authors' defaults are ours):

1. **Raters** (once, at the LLM input, l.198-204 of ``modelling_sparse_llama.py`` on ``main``). With ``V``
   the visual and ``T`` the text embeddings (every token after the image: the instruction and the
   assistant prefix), ``m = mean_over_visual(softmax_over_text(V T^T))``; the raters are the text tokens
   with ``m_t > mean(m)``. Every pruning layer scores with these same text tokens (l.253, l.259).
2. **Scores**, at each pruning layer: the decoder layer's attention, averaged over heads, of the rater
   rows to the visual columns, averaged over the raters: one score per visual token.
3. **Keep**: the ``keep`` tokens of largest score (``topk``), ``keep = min(count, N - 1)`` with the
   per-layer ``count`` of ``sparse_token_dict[retained]``: ``192: [300, 200, 110]``,
   ``128: [303, 110, 36]``, ``96: [238, 48, 26]``, ``64: [66, 30, 17]`` at layers ``[2, 6, 15]`` for
   LLaVA-1.5's ``N = 576``.
4. **Recycle**: of the ``P = N - keep`` pruned tokens, the ``r = int(0.3 P) + 1`` of largest score
   (``recycle_ratio = 0.3``) are clustered into ``c = int(r / 10) + 1`` clusters
   (``cluster_divisor = 10``) by density-peak clustering with k-nearest neighbours (DPC-KNN, ``k = c``):
   distances ``d_ij = ||x_i - x_j|| / sqrt(D)``, density ``rho_i = exp(-mean(d_i^2 over its c nearest,
   itself included))``, ``delta_i`` = distance to the nearest denser token (the largest distance of the
   set for the densest), centres = the ``c`` largest ``rho_i * delta_i``, every token joins its nearest
   centre (a centre joins itself), and each cluster becomes the mean of its members. The other
   ``P - r`` pruned tokens are dropped.
5. The layer's output holds ``keep + c`` visual tokens: the kept ones and the ``c`` merged ones. Later
   layers see only those (the next pruning layer re-scores and re-recycles all of them, merged ones
   included).

Here one call of :meth:`compress` is one pruning layer. ``tokens`` are the visual hidden states there and
``Context.cross_attention`` ``[B, T, N]`` the head-averaged attention of the ``T`` text tokens (those after
the image) to the ``N`` visual tokens in the layer whose attention the authors read. The budget
``K`` is the number of outputs, kept plus merged; :meth:`stage_budgets` gives the authors' ``K`` per layer
(``[309, 204, 113]`` for ``retained=192``, ``N = 576``) and a call splits its ``K`` back into ``keep`` and
``c`` (below): with ``Context.layer`` one of ``layers``, from that stage's count, as the authors.
Outputs are ordered by position: a kept token at its own position, a merged token at its cluster centre's
position (the density peak, a pruned token, so no position is used twice);
``assignment`` maps every recycled token to its cluster's slot and the ``P - r`` others to ``-1``.
The first stage chooses the raters and returns them in ``info["raters"]``; a stage given ``Context.raters``
scores with those (the in-LLM integration hands each stage the previous stage's: :attr:`carries`), so the
first stage's raters are used at every layer, as the authors'. ``raters_per_layer=True`` (not the
authors') chooses them afresh at every stage. A direct call without ``Context.raters`` is a first stage.
In a padded batch, give the padding text rows of ``cross_attention`` as zeros: with the attention rule a
zero row is never above the mean, so it never rates.

Layers: a stage at ``layer = l`` acts on the hidden states entering decoder layer ``l`` with the
attention of layer ``l - 1`` (as FastV's ``layer = 2``); the authors score with the attention of layer
``2`` and cut the output of that same layer, so their ``pruning_loc = [2, 6, 15]`` is our
``layers = [3, 7, 16]``.

Departures from the authors' code:

* **Budget split.** The authors fix ``keep`` and the output count follows. We are given the output count
  ``K``. At one of ``layers`` (``Context.layer``) the stage's count gives their ``keep = min(count, N -
  1)`` when it yields ``K`` (``keep_counts``; the table's, scaled from ``Context.schedule_n``, the tokens
  entering the first stage, which the integration sets; at the first stage these are the ``N`` tokens).
  Otherwise (a direct call without ``layer``, a later stage of the scaled table without
  ``schedule_n``, or another ``K``) we take the largest ``keep`` with ``keep + c(N - keep) = K`` (``keep +
  c`` grows by 0 or 1 per extra kept token, so such a ``keep`` exists for every ``K`` from ``c(N)`` to
  ``N``); where ``c`` drops by one, two ``keep`` give the same ``K`` (``46 + 17 = 47 + 16`` at ``N = 576``)
  and this may keep one more token and make one cluster fewer than the authors' count would. It gives
  back their ``keep`` for all twelve entries of their table at ``N = 576``. Budgets below ``c(N)`` (zero
  tokens kept) raise ``ValueError`` unless ``recycle=False``. ``K = N`` without a count keeps everything
  with no merged token (the authors always prune at least one token, ``min(count, N - 1)``, and recycle
  it as a cluster of one: the same tokens, which is what a stage with a count does).
* **Raters from attention in the integration.** The authors choose the raters from the visual and text
  embeddings at the LLM input (the hidden states entering layer 0); the in-LLM integration supplies no
  embeddings, so there the first stage applies their mean-threshold rule to its attention (below), and
  every later stage reuses those raters. ``raters="embeddings"`` applies their rule to
  ``Context.text_embeddings`` ``[B, T, D]`` and ``Context.image_embeddings`` ``[B, N, D]`` (the visual
  tokens in the same space; the tokens themselves when absent): the authors' raters when these are the
  LLM's input embeddings of the text after the image and of the ``N`` visual tokens.
  ``raters="attention"`` applies the same rule to the attention instead: each visual token's column of
  ``cross_attention`` normalised over the text tokens takes the place of ``softmax_over_text(V T^T)``,
  then the mean over the visual tokens and the mean threshold as theirs. ``raters="auto"`` (default)
  uses the embeddings when ``Context.text_embeddings`` is given, else the attention. When no text token
  is above the mean (all equal, e.g. ``T = 1``), every text token rates; the authors' mean over an empty
  set would be NaN.
* **Fixed counts, not the rank.** The paper's rank-based adaptive count (``v1.0`` code,
  ``attn_postprocess_rank``: ``keep = min(int(13.5 * rank(A_raters)), N - 1)``) is not what their ICML
  release runs, and our budget is given by the caller. ``info["rater_rank"]`` reports that rank for
  analysis.
* **Ties.** The authors add ``1e-6 * rand`` to the densities to break ties; we break them
  deterministically: of two equal densities, the token of higher score (then lower position) counts as
  the denser. Score ties in the keep / recycle ranking and in the choice of centres go to the lower
  position / the higher-score candidate (``torch.topk`` leaves them unspecified); a token equidistant
  from two centres joins the one of larger ``rho * delta``.
* **Where merged tokens sit.** The authors append the merged tokens after the kept visual tokens and
  renumber the position ids of the shorter sequence; ours sit at their centres' positions (our output is
  ordered by position), and the sequence is renumbered too (``in_llm_positions = "renumber"``).
* **Merge weights.** The authors divide each cluster's sum by ``count + 1e-6``; we divide by ``count``
  (a relative difference below ``1e-6``).
* **Schedule for other N.** The authors' counts are for ``N = 576``; for another first-stage ``N``,
  :meth:`stage_budgets` scales them by ``N / 576`` (rounded half up, at least 1). ``keep_counts`` gives
  explicit counts instead.
* Maths in float32 (the authors run in float16), except the pairwise distances: ``||a||^2 + ||b||^2 - 2 a.b``
  in float64 (the products of float32 values are exact there), in blocks of rows (no ``[B, r, r, D]``
  difference tensor, no whole ``[B, r, r]`` matrix), rounded to float32. Squared distances below the
  float64 rounding error of that form (``4 D 2^-53 (||a||^2 + ||b||^2)``) count as 0, so identical
  tokens are at distance 0 and tie as in the authors' rule; tokens a few float32 ulps apart count as
  identical too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import Boolean, Interval, IsNone, ListOf, Options
from tokencomp.errors import InputError, InvalidParameterError
from tokencomp.kernels import batched_gather, row_blocks, rows_matmul, slots_of
from tokencomp.kernels import blocks as _blocks
from tokencomp.kernels.attention import rank_descending
from tokencomp.kernels.blocks import token_scale
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context
from tokencomp.validation import check_int

#: The authors' per-layer top-k counts at their three pruning layers, by ``RETAIN_TOKN`` (``N = 576``).
AUTHORS_KEEP = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
#: Number of visual tokens the authors' counts are for (LLaVA-1.5).
AUTHORS_N = 576
RATERS = ("auto", "attention", "embeddings")


def recycled_count(pruned: int, recycle_ratio: float = 0.3) -> int:
    """Pruned tokens that are recycled: ``int(P * recycle_ratio) + 1``, at most ``P`` (0 when ``P = 0``)."""
    if pruned <= 0:
        return 0
    return min(pruned, int(pruned * recycle_ratio) + 1)


def cluster_count(pruned: int, recycle_ratio: float = 0.3, cluster_divisor: int = 10) -> int:
    """Merged tokens made from ``P`` pruned ones: ``int(r / cluster_divisor) + 1`` clusters of the ``r`` recycled."""
    r = recycled_count(pruned, recycle_ratio)
    if r == 0:
        return 0
    return min(r, r // cluster_divisor + 1)


@register("sparsevlm")
class SparseVLM(Compressor):
    """Keep the visual tokens the text raters attend to most; recycle the best pruned ones into clusters.

    Parameters
    ----------
    layers : list of int, default [3, 7, 16]
        The decoder layers the stages run at (strictly increasing, >= 1): a stage at ``l`` cuts the hidden
        states entering layer ``l``, scored with the attention of layer ``l - 1``. The authors'
        ``pruning_loc = [2, 6, 15]`` (score with layer ``i``'s attention, cut its output).
    retained : {192, 128, 96, 64}, default 192
        The authors' ``RETAIN_TOKN``: which row of their per-layer count table :meth:`stage_budgets`
        uses (it needs three ``layers``). Ignored when ``keep_counts`` is given.
    keep_counts : list of int, optional
        Explicit top-k counts, one per entry of ``layers`` (each >= 1), instead of the authors' table.
    recycle : bool, default True
        Merge the best pruned tokens into a few extra tokens (the authors' recycling); ``False`` drops
        every pruned token.
    recycle_ratio : float, default 0.3
        Share of the ``P`` pruned tokens that is recycled: ``r = min(P, int(P * recycle_ratio) + 1)``,
        in [0, 1].
    cluster_divisor : int, default 10
        The ``r`` recycled tokens form ``c = min(r, r // cluster_divisor + 1)`` clusters, >= 1.
    raters : {"auto", "attention", "embeddings"}, default "auto"
        How the text raters are chosen: the authors' mean-threshold rule on the embeddings
        (``Context.text_embeddings``, with ``Context.image_embeddings`` or the tokens), on the attention
        (``Context.cross_attention``), or ``"auto"``: embeddings when ``text_embeddings`` is given, else
        attention.
    raters_per_layer : bool, default False
        ``False`` (the authors'): the raters are chosen once, at the first stage, and reused at every
        later one (a stage given ``Context.raters``, as the in-LLM integration hands it from the previous
        stage, uses those). ``True``: every stage chooses them afresh from its own tokens and attention,
        ignoring ``Context.raters``.

    Notes
    -----
    ``info``: ``scores`` ``[B, N]`` the raters' mean attention, ``raters`` ``[B, T]`` bool (those used: chosen
    here, or ``Context.raters`` reused),
    ``recycled`` ``[B, K]`` bool marking the merged output slots, ``rater_rank`` ``[B]`` the rank of the
    raters' attention rows (the paper's adaptive-count statistic).

    Not scale-invariant (``scale_invariant = False``): the clustering's density ``exp(-d^2)`` uses
    absolute distances, so for tokens of size ``1e-30`` every density is 1 and for size ``1e30`` every
    one is 0, and the centres then follow the tie rule. The kept (non-merged) tokens depend on the
    attention only.
    """

    stage = "in_llm"
    needs_attention = True
    text_conditioned = True
    deterministic = True
    requires = ("cross_attention",)
    carries = ("raters",)  # chosen once at the first stage, reused at the later ones
    in_llm_positions = "renumber"
    budget_param = "retained"
    scale_invariant = False  # DPC-KNN's density exp(-d^2) is absolute (see Notes)
    summary = (
        "Text raters' attention keeps visual tokens after LLM layers 2/6/15; best pruned ones recycled by DPC-KNN."
    )
    complexity = "O(T N + N^2 D)"
    info_layout = {"scores": "token", "raters": "row", "rater_rank": "row", "recycled": "row"}
    paper = (
        "Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model "
        "Inference, ICML 2025 (arXiv 2410.04417)"
    )
    parameter_constraints = {
        "layers": (ListOf(Interval(int, 1), increasing=True),),
        "retained": (
            Options(
                tuple(AUTHORS_KEEP),
                hint="These are the authors' settings; for other schedules pass keep_counts=[...] (one per layer).",
            ),
        ),
        "keep_counts": (IsNone(), ListOf(Interval(int, 1))),
        "recycle": (Boolean(),),
        "recycle_ratio": (Interval(float, 0.0, 1.0),),
        "cluster_divisor": (Interval(int, 1),),
        "raters": (Options(RATERS),),
        "raters_per_layer": (Boolean(),),
    }

    def __init__(
        self,
        *,
        layers: list[int] = (3, 7, 16),  # type: ignore[assignment]
        retained: int = 192,
        keep_counts: Optional[list[int]] = None,
        recycle: bool = True,
        recycle_ratio: float = 0.3,
        cluster_divisor: int = 10,
        raters: str = "auto",
        raters_per_layer: bool = False,
    ) -> None:
        self.layers = layers
        self.retained = retained
        self.keep_counts = keep_counts
        expected = len(AUTHORS_KEEP[self.retained]) if self.keep_counts is None else len(self.keep_counts)
        if len(self.layers) != expected:
            what = "keep_counts" if self.keep_counts is not None else f"the authors' table (retained={self.retained})"
            raise InvalidParameterError(
                f"{self.display_name()}: parameter 'layers' has {len(self.layers)} entries ({self.layers}) "
                f"but {what} has "
                f"{expected} per-layer counts; give one count per layer with keep_counts=[...]."
            )
        self.recycle = recycle
        self.recycle_ratio = recycle_ratio
        self.cluster_divisor = cluster_divisor
        self.raters = raters
        self.raters_per_layer = raters_per_layer

    # ------------------------------------------------------------------ the schedule
    def _clusters(self, pruned: int) -> int:
        return cluster_count(pruned, self.recycle_ratio, self.cluster_divisor) if self.recycle else 0

    def llm_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    def stage_counts(self, n: int, final_k: Optional[int] = None) -> list[int]:
        """Top-k counts per layer for ``n`` visual tokens entering the first stage.

        The authors' row ``AUTHORS_KEEP[final_k]`` (``final_k`` defaults to ``retained``), scaled by
        ``n / 576`` when ``n != 576``; or ``keep_counts`` as given.
        """
        n = check_int(self.display_name(), "n", n, low=1)
        if self.keep_counts is not None:
            if final_k is not None:
                raise InputError(
                    f"{self.display_name()}: final_k={final_k!r} selects a row of the authors' table, "
                    "but this instance has "
                    f"explicit keep_counts={self.keep_counts}; drop final_k."
                )
            return list(self.keep_counts)
        key = self.retained if final_k is None else final_k
        if key not in AUTHORS_KEEP or isinstance(key, bool):
            raise InputError(
                f"{self.display_name()}: final_k must be one of {sorted(AUTHORS_KEEP, reverse=True)} "
                "(the authors' settings); "
                f"got {final_k!r}. Use keep_counts=[...] for other schedules."
            )
        counts = AUTHORS_KEEP[key]
        if n == AUTHORS_N:
            return list(counts)
        return [max(1, (2 * c * n + AUTHORS_N) // (2 * AUTHORS_N)) for c in counts]

    def stage_budgets(self, n: int) -> list[int]:
        """Visual tokens leaving each stage (kept plus merged), starting from ``n``: the budgets of the calls.

        At each stage ``keep = min(count, n_s - 1)`` of the ``n_s`` entering tokens (the authors' rule;
        ``keep = 1`` when ``n_s = 1``), plus ``c(n_s - keep)`` merged tokens when recycling. For
        ``n = 576``: ``[309, 204, 113]`` (192), ``[312, 117, 39]`` (128), ``[249, 55, 27]`` (96),
        ``[82, 32, 18]`` (64).
        """
        out, m = [], n
        for count in self.stage_counts(n):
            keep = min(count, m - 1) if m > 1 else 1
            m = keep + self._clusters(m - keep)
            out.append(m)
        return out

    def split(self, n: int, k: int, count: Optional[int] = None) -> tuple[int, int]:
        """``(keep, clusters)`` for ``k`` outputs from ``n`` tokens.

        With the stage's top-k ``count`` (the authors' rule): ``keep = min(count, n - 1)`` (1 when
        ``n = 1``), when that gives ``keep + c(n - keep) = k``. Otherwise (no count, or a ``k`` that is
        not this count's output): the largest ``keep`` with ``keep + c(n - keep) = k``. ``k`` alone does
        not tell: ``keep + c(n - keep)`` stays the same from ``keep`` to ``keep + 1`` when ``c`` drops by
        one (at ``N = 576``: ``46 + 17 = 47 + 16 = 63``), and only the count says which the authors kept.
        """
        if not self.recycle:
            return k, 0
        if count is not None:
            keep = min(count, n - 1) if n > 1 else 1
            if keep + self._clusters(n - keep) == k:
                return keep, k - keep
        lo, hi = 0, n  # f(keep) = keep + c(n - keep) is non-decreasing: largest keep with f(keep) <= k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid + self._clusters(n - mid) <= k:
                lo = mid
            else:
                hi = mid - 1
        return lo, k - lo

    def stage_count(self, n: int, context: Context) -> Optional[int]:
        """The top-k count of the stage at ``context.layer`` (one of ``layers``), ``None`` when unknown.

        ``keep_counts[s]`` as given; the authors' (scaled) table entry for the ``schedule_n`` tokens that
        entered the first stage (``Context.schedule_n``; at the first stage these are the ``n`` tokens
        themselves). ``None`` for another or no layer, or a later stage of the table without
        ``schedule_n``.
        """
        if context.layer not in self.layers:
            return None
        s = self.layers.index(context.layer)
        if self.keep_counts is not None:
            return self.keep_counts[s]
        first = context.schedule_n if context.schedule_n is not None else n if s == 0 else None
        return None if first is None else self.stage_counts(first)[s]

    def _check_budget(self, k: int, n: int, context: Context) -> None:
        if self.recycle and k < self._clusters(n):
            raise InputError(
                f"{self.display_name()}: budget K={k} is below the minimum {self._clusters(n)} for N={n} "
                "with recycling: even "
                f"keeping no token, the N pruned tokens are recycled into {self._clusters(n)} merged tokens "
                f"(recycle_ratio={self.recycle_ratio}, cluster_divisor={self.cluster_divisor}). The budget must "
                f"be in [{self._clusters(n)}, {n}]; raise it or pass recycle=False."
            )

    # ------------------------------------------------------------------ one pruning layer
    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        # Maths in float32. The tokens are only read where needed (the kept and the recycled rows, and the
        # embedding raters' product, block by block): no float32 copy of half-precision tokens.
        b, n, d = tokens.shape
        dev = tokens.device
        attn = context.cross_attention.float()  # [B, T, N]; finite, as checked by compress()
        if attn.shape[1] < 1:
            raise InputError(
                f"{self.display_name()}: context.cross_attention has T=0 text tokens; it needs at least one row."
            )

        # 1. Raters, 2. scores: the raters' mean attention to each visual token.
        raters = self._raters(tokens, attn, context)  # [B, T] bool
        w = raters.to(attn.dtype)
        scores = (attn * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)  # [B, N]
        rank = torch.linalg.matrix_rank(attn * w.unsqueeze(-1))
        order = rank_descending(scores)  # [B, N] by decreasing score, ties to the lower position
        keep, c = self.split(n, k, self.stage_count(n, context))
        info = {"scores": scores, "raters": raters, "rater_rank": rank}

        # 3. Keep the top ``keep``.
        keep_pos = order[:, :keep].sort(dim=-1).values
        if c == 0:
            indices = keep_pos
            info["recycled"] = torch.zeros(b, k, dtype=torch.bool, device=dev)
            return CompressionResult(batched_gather(tokens, indices).float(), indices, slots_of(indices, n), info)

        # 4. Recycle: the r best pruned tokens (in decreasing score), clustered into c merged tokens.
        r = recycled_count(n - keep, self.recycle_ratio)
        cand_pos = order[:, keep : keep + r]  # [B, r]
        cand = batched_gather(tokens, cand_pos).float()  # [B, r, D]
        centres, owner = _dpc_knn(cand, c)  # [B, c] candidate ids; [B, r] cluster ids
        sums = torch.zeros(b, c, d, dtype=cand.dtype, device=dev)
        sums.scatter_add_(1, owner.unsqueeze(-1).expand(-1, -1, d), cand)
        counts = torch.zeros(b, c, dtype=cand.dtype, device=dev)
        counts.scatter_add_(1, owner, torch.ones_like(owner, dtype=cand.dtype))
        merged = sums / counts.unsqueeze(-1)  # every cluster holds at least its centre
        centre_pos = torch.gather(cand_pos, 1, centres)

        # 5. Output by position: kept tokens at theirs, merged tokens at their centres'.
        positions = torch.cat([keep_pos, centre_pos], dim=1)
        values = torch.cat([batched_gather(tokens, keep_pos).float(), merged], dim=1)
        indices, perm = positions.sort(dim=-1)
        slot_of = perm.argsort(dim=-1)  # entry of ``positions`` -> output slot
        assignment = slots_of(indices, n)
        assignment.scatter_(1, cand_pos, torch.gather(slot_of[:, keep:], 1, owner))
        info["recycled"] = perm >= keep
        return CompressionResult(batched_gather(values, perm), indices, assignment, info)

    def _raters(self, x: torch.Tensor, attn: torch.Tensor, context: Context) -> torch.Tensor:
        """``[B, T]`` bool: text tokens whose mean relevance to the visual tokens is above the mean.

        Those of ``Context.raters`` (an earlier stage's) unless ``raters_per_layer``.
        """
        t = attn.shape[1]
        if context.raters is not None and not self.raters_per_layer:
            return self._given_raters(context.raters, t).to(attn.device)
        mode = self.raters
        if mode == "auto":
            mode = "embeddings" if context.text_embeddings is not None else "attention"
        if mode == "embeddings":
            text = context.text_embeddings
            if text is None:
                raise InputError(
                    f"{self.display_name()}: raters='embeddings' needs context.text_embeddings [B, T, D], "
                    "which is missing. "
                    "Pass tokencomp.Context(text_embeddings=...) or use raters='attention'."
                )
            visual = x if context.image_embeddings is None else context.image_embeddings
            if text.shape[1] != t or text.shape[2] != visual.shape[2]:
                raise InputError(
                    f"{self.display_name()}: context.text_embeddings must be [B, T, D] with the T={t} text tokens of "
                    f"context.cross_attention and the visual tokens' D={visual.shape[2]}; got {tuple(text.shape)}."
                )
            m = rows_matmul(visual, text.float().transpose(1, 2)).softmax(dim=2).mean(dim=1)  # [B, T]
        else:
            col = attn / attn.sum(dim=1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
            m = col.mean(dim=2)  # [B, T]
        raters = m > m.mean(dim=1, keepdim=True)
        return raters | ~raters.any(dim=1, keepdim=True)  # nobody above the mean: everyone rates

    def _given_raters(self, raters: torch.Tensor, t: int) -> torch.Tensor:
        """``Context.raters`` (bool: checked with its layout) checked to span the ``T`` rows of ``cross_attention``,
        with a rater per row."""
        if raters.shape[1] != t:
            raise InputError(
                f"{self.display_name()}: context.raters must be a bool tensor [B, T] over the T={t} text tokens of "
                f"context.cross_attention; got {raters.dtype} {tuple(raters.shape)}. Pass the info['raters'] of an "
                "earlier stage on the same prompt, or leave it out (or set raters_per_layer=True) to choose them here."
            )
        if not bool(raters.any(dim=1).all()):
            raise InputError(
                f"{self.display_name()}: context.raters has a row without any rater (every entry False); each row "
                "needs at least one True text token."
            )
        return raters


def _distances(
    a: torch.Tensor,
    a_sq: torch.Tensor,
    other: torch.Tensor,
    other_sq: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[B, I, J]`` float32 distances ``||a_i - o_j|| / sqrt(D)`` of float64 rows ``a`` ``[B, I, D]``,
    ``other`` ``[B, J, D]``.

    ``||a||^2 + ||o||^2 - 2 a.o`` in float64 (one matrix product; exact products of the float32 values,
    error about ``D 2^-53 (||a||^2 + ||o||^2)``), the Euclidean distance rounded to float32 and divided by
    ``sqrt(D)`` in float32, as the float32 ``cdist`` it replaces. Squared distances within four times that
    error bound are taken as 0, so equal rows are at distance exactly 0 (the reference's ties). About 13
    bytes of temporaries per distance.

    ``a`` and ``other`` may be the rows times a power of two ``scale`` ``[B, 1, 1]`` (as :func:`_dpc_knn`
    passes them, so that their squares neither overflow the float32 tolerance for tokens of size ``1e30``
    nor vanish): the distances are divided by it, the same values bit for bit.
    """
    d = a.shape[2]
    eps = 4 * d * 2.0**-53
    sq = a_sq.unsqueeze(2) + other_sq.unsqueeze(1)  # [B, I, J]
    tol = (a_sq.float() * eps).unsqueeze(2) + (other_sq.float() * eps).unsqueeze(1)
    zero = sq.baddbmm_(a, other.transpose(1, 2), alpha=-2) <= tol
    del tol
    dist = sq.masked_fill_(zero, 0.0).sqrt_().float()
    del sq, zero
    dist.div_(math.sqrt(d))
    return dist if scale is None else dist.div_(scale)


def _pair_elements() -> int:
    """Distances per block: half of :data:`BLOCK_ELEMENTS`, as each needs ~13 bytes of temporaries."""
    return max(1, _blocks.BLOCK_ELEMENTS // 2)


def _prefix_blocks(b: int, r: int, elements: int) -> list[slice]:
    """Blocks ``[start, stop)`` of ``range(r)`` whose ``[B, stop - start, stop]`` prefix distances hold at most
    ``elements`` (at least one row each): larger blocks where the prefix is short."""
    out, start, limit = [], 0, max(1, elements // b)
    while start < r:
        rows = max(1, (math.isqrt(start * start + 4 * limit) - start) // 2)  # rows * (start + rows) <= limit
        out.append(slice(start, min(r, start + rows)))
        start += rows
    return out


def _dpc_knn(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest neighbours (``k = c``) of ``x`` ``[B, r, D]`` into ``c`` clusters.

    Returns the centres ``[B, c]`` (row indices, by decreasing ``rho * delta``) and each row's cluster
    ``[B, r]`` in ``[0, c)``. Ties: of two equal densities the lower row index counts as the denser; equal
    ``rho * delta`` go to the lower row; a row equidistant from two centres joins the earlier centre.

    The ``[B, r, r]`` distances are never held whole: three passes over blocks of rows compute the
    densities and the largest distance, then ``delta`` (rows in decreasing density, each block against
    the denser rows before it, about half the pairs), then each row's nearest centre.
    """
    b, r, d = x.shape
    dev = x.device
    # Products of float32 values are exact in float64. The rows are scaled by a power of two per batch row
    # (token_scale: exact, the distances are scaled back), so the float32 tolerance of _distances neither
    # overflows for tokens of size 1e30 (every distance would count as 0) nor vanishes for 1e-30.
    f = token_scale(x)  # [B, 1, 1] float32
    f64 = f.double()
    xd = x.double().mul_(f64)
    sq = torch.empty(b, r, dtype=xd.dtype, device=dev)  # [B, r] squared norms
    for blk in row_blocks(b, r, d):
        sq[:, blk] = xd[:, blk].square().sum(dim=-1)

    # Pass 1: density from the c nearest (itself included), and the largest distance.
    density = torch.empty(b, r, dtype=torch.float32, device=dev)
    dist_max = torch.full((b,), float("-inf"), dtype=torch.float32, device=dev)
    for blk in row_blocks(b, r, r, _pair_elements()):
        dist = _distances(xd[:, blk], sq[:, blk], xd, sq, f)  # [B, rows, r]
        knn = dist.topk(c, dim=-1, largest=False).values
        density[:, blk] = (-(knn**2).mean(dim=-1)).exp()
        dist_max = torch.maximum(dist_max, dist.flatten(1).max(dim=-1).values)

    # Pass 2: delta, the distance to the nearest denser row. In decreasing density (ties: the lower row
    # first, the tie rule), the denser rows of rank p are exactly ranks 0 .. p - 1; the densest takes dist_max.
    by_density = rank_descending(density)  # [B, r]
    for blk in row_blocks(b, r, d):  # the rows in decreasing density, in place of the original order
        xd[:, blk].copy_(batched_gather(x, by_density[:, blk])).mul_(f64)
    sq = torch.gather(sq, 1, by_density)
    delta_sorted = torch.empty(b, r, dtype=torch.float32, device=dev)
    ranks = torch.arange(r, device=dev)
    for blk in _prefix_blocks(b, r, _pair_elements()):
        dist = _distances(xd[:, blk], sq[:, blk], xd[:, : blk.stop], sq[:, : blk.stop], f)  # [B, rows, stop]
        dist.masked_fill_(ranks[: blk.stop] >= ranks[blk].unsqueeze(1), float("inf"))  # only denser columns
        delta_sorted[:, blk] = torch.minimum(dist.min(dim=-1).values, dist_max.unsqueeze(1))
    delta = torch.empty_like(delta_sorted).scatter_(1, by_density, delta_sorted)
    centres = rank_descending(delta * density)[:, :c]  # [B, c]

    # Pass 3: every row joins its nearest centre (the first minimum: the earlier centre); a centre itself.
    rank_of = torch.empty_like(by_density).scatter_(1, by_density, ranks.expand(b, r))
    centre_rank = torch.gather(rank_of, 1, centres)
    xc, sc = batched_gather(xd, centre_rank), torch.gather(sq, 1, centre_rank)
    owner_sorted = torch.empty(b, r, dtype=torch.int64, device=dev)
    for blk in row_blocks(b, r, c, _pair_elements()):
        owner_sorted[:, blk] = _distances(xd[:, blk], sq[:, blk], xc, sc, f).argmin(dim=-1)
    owner = torch.empty_like(owner_sorted).scatter_(1, by_density, owner_sorted)
    owner.scatter_(1, centres, torch.arange(c, device=dev).expand(b, c).contiguous())
    return centres, owner
