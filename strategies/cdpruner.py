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

The ``N x N`` kernel is never materialised: the row ``L[j]`` of the one pick per step is
``r_j r (x_hat_j . x_hat^T)``, one matrix-vector product, so memory is ``O(k N)`` for the ``c`` vectors.

Departures, all stated:

- **Per-sample normalisation.** The authors' min-max in step 2 runs over the whole batch (they use
  batch size 1); ours runs per sample, so a sample's result does not depend on its batch mates.
- **Past the kernel's rank.** ``L`` has rank at most ``D``; once the picks span it, every remaining
  gain ``d^2`` is zero up to rounding and the authors' division by ``d_j`` yields garbage or NaN. From
  that step on (largest gain ``<= 1e-6`` of the largest diagonal entry) we pick by the kernel's
  diagonal ``r_i^2 S_ii``, the DPP's own first criterion, and stop updating ``c``.
- Without ``Context.image_embeddings`` the tokens themselves are taken as the joint space (then the
  text embeddings must have the tokens' dimension).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tokencomp.base import Compressor
from tokencomp.kernels import selection_result
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context
from tokencomp.validation import check_float

_DEGENERATE = 1e-6


def relevance(image: torch.Tensor, text: torch.Tensor, theta: Optional[float]) -> torch.Tensor:
    """Step 2 (and the optional ``theta``): ``[B, N]`` relevance of each token to the instruction."""
    cos = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)  # [B, N, T]
    r = (-cos).mean(dim=-1)
    low, high = r.min(dim=1, keepdim=True).values, r.max(dim=1, keepdim=True).values
    r = (r - low + 1e-6) / (high - low)
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


def greedy_map(x_hat: torch.Tensor, r: torch.Tensor, k: int) -> torch.Tensor:
    """Step 4 on the kernel ``L = diag(r) (x_hat x_hat^T) diag(r)``: ``[B, k]`` picks, in pick order."""
    b, n, _ = x_hat.shape
    rows = torch.arange(b, device=x_hat.device)
    diag = r.square() * x_hat.square().sum(dim=-1)  # L_ii
    gains = diag.clone()
    c = torch.zeros(k, b, n, device=x_hat.device)
    order = torch.empty(b, k, dtype=torch.int64, device=x_hat.device)
    retired = torch.zeros(b, n, dtype=torch.bool, device=x_hat.device)
    scale = diag.max(dim=1).values
    for i in range(k):
        j = gains.argmax(dim=1)
        best = gains[rows, j]
        spent = best <= _DEGENERATE * scale  # the picks span the kernel: no gain is left
        j = torch.where(spent, diag.masked_fill(retired, float("-inf")).argmax(dim=1), j)
        order[:, i] = j
        row = r[rows, j, None] * r * torch.einsum("bd,bnd->bn", x_hat[rows, j], x_hat)  # L[j]
        e = (row - torch.einsum("tb,tbn->bn", c[:i, rows, j], c[:i])) / best.clamp_min(1e-30).sqrt()[:, None]
        e = torch.where(spent[:, None], torch.zeros_like(e), e)
        c[i] = e
        gains = gains - e.square()
        retired[rows, j] = True
        gains = gains.masked_fill(retired, float("-inf"))
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
    paper = "Zhang et al., CDPruner, NeurIPS 2025 (arXiv 2506.10967)"

    def __init__(self, *, theta: Optional[float] = None) -> None:
        if theta is not None:
            theta = check_float("cdpruner", "theta", theta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.theta = theta

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        image = context.image_embeddings if context.image_embeddings is not None else tokens
        if context.text_embeddings.shape[2] != image.shape[2]:
            raise ValueError(
                f"cdpruner: context.text_embeddings has dimension {context.text_embeddings.shape[2]} but the "
                f"tokens have {image.shape[2]}; pass context.image_embeddings [B, N, "
                f"{context.text_embeddings.shape[2]}] (the tokens in the text embeddings' space)."
            )
        r = relevance(image, context.text_embeddings, self.theta)
        order = greedy_map(F.normalize(tokens.float(), dim=-1), r, k)
        return selection_result(tokens, order.sort(dim=1).values, order=order, relevance=r)
