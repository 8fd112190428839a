"""CDPruner: a conditional determinantal point process over the tokens, weighted by instruction relevance.

Paper: Zhang et al., *Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs* (CDPruner), NeurIPS 2025 (arXiv 2506.10967). Authors' code: ``Theia-4869/CDPruner``
(``LlavaMetaForCausalLM.encode_images`` in ``llava/model/llava_arch.py`` and the CLIP tower's
``forward`` in ``llava/model/multimodal_encoder/clip_encoder.py``).

The algorithm, before the language model:

1. **Similarity.** ``S = x_hat x_hat^T``, the cosine similarity of the projected visual tokens (float32).
2. **Relevance.** CLIP puts the patches (post-layernorm, visual projection) and the instruction (text
   tower, one embedding per 77-token segment) in one space. Per token, ``r_i = mean_t(-cos(v_i, t_t))``,
   then min-max normalised: ``r = (r - min r + 1e-6) / (max r - min r)``. The minus sign is the
   authors' (their comment notes LLaVA's CLIP patch embeddings are anti-aligned with the text).
3. **Kernel.** ``L = diag(r) S diag(r)``: similar tokens repel, relevant tokens weigh more. The
   authors' commented-out option ``theta`` replaces ``r`` by ``exp(alpha r)`` with
   ``alpha = theta / (2 (1 - theta))``; ``theta=None`` (their released default) leaves ``r`` as is.
4. **Greedy MAP inference** (Chen et al., 2018, fast incremental Cholesky): pick ``j = argmax d_j^2``
   (``d^2`` starts as the kernel's diagonal), ``e = (L[j] - c_{<i}[j]^T c_{<i}) / d_j``, store ``e`` as
   ``c_i``, lower ``d^2`` by ``e^2``, retire ``j``; ``k`` picks, kept in their original order, the rest
   dropped.

The ``N x N`` kernel is never materialised, nor the ``k`` vectors ``c_i`` of length ``N``. ``L`` has
the low-rank form ``diag(r) x_hat x_hat^T diag(r)``, so every ``c_i`` is ``r * (x_hat w_i)`` for a direction
``w_i`` of length ``D``: ``w_i = (r_j x_hat_j - sum_t c_t[j] w_t) / d_j`` with ``c_t[j] = r_j x_hat_j . w_t``.
Each step then reads the tokens once (one matrix-vector product for ``c_i``) and the ``k x D`` directions,
where the literal update reads all earlier ``c`` vectors as well (``i N`` per step, ``O(N k^2)`` in all:
at video scale that doubled the time, and ``k N`` floats were 2.25x the tokens' memory). The numbers are
the same up to float rounding; the picks are the same except where the choice is made on rounding noise
(see "past the kernel's rank" below). The normalised tokens are stored as columns ``[B, D, N']``, the
faster layout for the per-step product (:func:`~tokencomp.kernels.matvec.column_dots`, cut into four
pieces for a single image), built row block by row block and padded with zero columns
whose gain is ``-inf``.

Departures, all stated:

- **Per-sample normalisation.** The authors' min-max in step 2 runs over the whole batch (they use
  batch size 1); ours runs per sample, so a sample's result does not depend on its batch mates.
- **Past the kernel's rank.** ``L`` has rank at most ``D``; once the picks span it, every remaining
  gain ``d^2`` is zero up to rounding and the authors' division by ``d_j`` yields garbage or NaN. From
  that step on (largest gain ``<= 1e-6`` of the largest diagonal entry) we pick by the kernel's
  diagonal ``r_i^2 S_ii``, the DPP's own first criterion, and stop updating ``c`` (``w_i = 0``). In
  float32 the leftover gains right at the rank are rounding noise of about that size (``1-2e-6`` at
  ``D = 1024``), so the few picks made there before the threshold is met depend on the rounding of the
  update (they differ between the literal ``c`` update and the ``w`` form above).
- **Equal relevance.** When every token is equally relevant (``max r = min r``: identical or zero
  tokens), the min-max of step 2 divides by zero (the authors' code gives NaN or infinity); we set
  ``r = 1`` for every token, which leaves a plain similarity DPP.
- Tokens and text embeddings are scaled by a power of two per row before they are normalised (the
  same unit vectors, but a token of size ``1e30`` or ``1e-30`` has a finite, nonzero norm there).
- Without ``Context.image_embeddings`` the tokens themselves are taken as the joint space (then the
  text embeddings must have the tokens' dimension).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import Interval, IsNone
from tokencomp.errors import InputError
from tokencomp.kernels import selection_result
from tokencomp.kernels.blocks import row_blocks, unit_rows, unit_vectors
from tokencomp.kernels.matvec import column_dots, column_pieces, padded_columns
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context

_DEGENERATE = 1e-6


def relevance(image: torch.Tensor, text: torch.Tensor, theta: Optional[float]) -> torch.Tensor:
    """Step 2 (and the optional ``theta``): ``[B, N]`` relevance of each token to the instruction."""
    cos = unit_rows(image) @ unit_vectors(text).transpose(1, 2)  # [B, N, T]
    r = (-cos).mean(dim=-1)
    low, high = r.min(dim=1, keepdim=True).values, r.max(dim=1, keepdim=True).values
    spread = high - low  # 0 when every token is equally relevant: then r = 1 for all
    r = torch.where(spread > 0, (r - low + 1e-6) / torch.where(spread > 0, spread, 1.0), torch.ones_like(r))
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


def unit_columns(tokens: torch.Tensor, pieces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_hat = F.normalize(tokens.float(), dim=-1)`` (same values) as columns ``[B, D, N']``, and ``[B, N]``
    ``|x_hat_n|^2``, built row block by row block: the only full-size tensor is the float32 result. Each
    row is scaled by a power of two first (:func:`~tokencomp.kernels.blocks.pow2_scale`: the same unit
    vectors, but no overflow or underflow of the norm for tokens of extreme size). The ``N' - N`` last
    columns (:func:`~tokencomp.kernels.matvec.padded_columns` for ``pieces``) are zero."""
    b, n, d = tokens.shape
    columns = torch.zeros(b, d, padded_columns(n, pieces), dtype=torch.float32, device=tokens.device)
    sq = torch.empty(b, n, dtype=torch.float32, device=tokens.device)
    for blk in row_blocks(b, n, d):
        rows = unit_vectors(tokens[:, blk])
        sq[:, blk] = rows.square().sum(dim=-1)
        columns[:, :, blk] = rows.transpose(1, 2)
    return columns, sq


def greedy_map(columns: torch.Tensor, pieces: int, r: torch.Tensor, k: int, sq: torch.Tensor) -> torch.Tensor:
    """Step 4 on the kernel ``L = diag(r) (x_hat x_hat^T) diag(r)``: ``[B, k]`` picks, in pick order.

    ``columns`` is ``x_hat^T`` ``[B, D, N']`` padded with zero columns for ``pieces`` and ``sq`` ``[B, N]``
    the squared norms of the ``x_hat`` rows (:func:`unit_columns`). ``c_i = r * (x_hat w_i)`` is never
    stored; only the directions ``w`` ``[B, k, D]``.
    """
    b, d, width = columns.shape
    n = sq.shape[1]
    device = columns.device
    diag = r.square() * sq  # L_ii
    r = torch.cat([r, r.new_zeros(b, width - n)], dim=1)  # the padding columns: relevance 0, gain -inf
    gains = torch.full((b, width), float("-inf"), device=device)
    gains[:, :n] = diag
    left = gains.clone()  # the diagonal with the picked tokens at -inf (the pick once no gain is left)
    retired = torch.zeros(b, width, dtype=torch.bool, device=device)
    retired[:, n:] = True
    w = torch.zeros(b, k, d, device=device)
    order = torch.empty(b, k, dtype=torch.int64, device=device)
    e = torch.empty(b, width, device=device)
    scale = diag.max(dim=1, keepdim=True).values
    for i in range(k):
        j = gains.argmax(dim=1, keepdim=True)  # [B, 1]
        best = gains.gather(1, j)
        spent = best <= _DEGENERATE * scale  # the picks span the kernel: no gain is left
        j = torch.where(spent, left.argmax(dim=1, keepdim=True), j)
        order[:, i : i + 1] = j
        rj = r.gather(1, j)  # [B, 1]
        xj = columns.gather(2, j.view(b, 1, 1).expand(b, d, 1))  # [B, D, 1] = x_hat_j
        past = w[:, :i]  # [B, i, D]
        cj = rj.unsqueeze(-1) * torch.bmm(past, xj)  # [B, i, 1]: c_t[j] for t < i
        wi = (rj * xj[:, :, 0] - torch.bmm(cj.transpose(1, 2), past)[:, 0]) / best.clamp_min(1e-30).sqrt()
        w[:, i] = wi.masked_fill_(spent, 0.0)
        column_dots(columns, w[:, i], pieces, e)  # x_hat . w_i
        ci = e.mul_(r)  # c_i = e_i of the authors' loop
        gains.sub_(ci.square_())
        retired.scatter_(1, j, True)
        gains.masked_fill_(retired, float("-inf"))
        left.scatter_(1, j, float("-inf"))
    return order


@register("cdpruner")
class CDPruner(Compressor):
    """Keep the ``k`` tokens of the greedy MAP of a relevance-weighted similarity DPP.

    Parameters
    ----------
    theta : float or None, default None
        In ``(0, 1)``: sharpen the relevance as ``exp(theta / (2 (1 - theta)) r)``; ``None`` uses ``r``
        itself (the authors' released setting).

    Notes
    -----
    Needs ``Context.text_embeddings`` ``[B, T, E]`` and, when ``E`` differs from the tokens' dimension,
    ``Context.image_embeddings`` ``[B, N, E]``. ``info["order"]`` holds the picks in pick order and
    ``info["relevance"]`` the ``[B, N]`` relevance.
    """

    stage = "pre_llm"
    needs_attention = False
    text_conditioned = True
    deterministic = True
    requires = ("text_embeddings",)
    summary = "Conditional DPP: similarity kernel weighted by instruction relevance, greedy MAP."
    complexity = "O(N T D + N K D)"
    scale_invariant = True
    info_layout = {"order": "position", "relevance": "token"}
    paper = "Zhang et al., CDPruner, NeurIPS 2025 (arXiv 2506.10967)"

    parameter_constraints = {"theta": (IsNone(), Interval(float, 0.0, 1.0, closed="neither"))}

    def __init__(self, *, theta: Optional[float] = None) -> None:
        self.theta = theta

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        image = context.image_embeddings if context.image_embeddings is not None else tokens
        if context.text_embeddings.shape[2] != image.shape[2]:
            raise InputError(
                f"{self.display_name()}: context.text_embeddings has dimension "
                f"{context.text_embeddings.shape[2]} but the "
                f"tokens have {image.shape[2]}; pass context.image_embeddings [B, N, "
                f"{context.text_embeddings.shape[2]}] (the tokens in the text embeddings' space)."
            )
        r = relevance(image, context.text_embeddings, self.theta)
        pieces = column_pieces(tokens.shape[0], tokens.device)
        columns, sq = unit_columns(tokens, pieces)
        order = greedy_map(columns, pieces, r, k, sq)
        return selection_result(tokens, order.sort(dim=1).values, order=order, relevance=r)
