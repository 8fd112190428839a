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
features that are kept, and their attention is the head-averaged [CLS] row). Ties in the attention
and similarity rankings go to the lower position / earlier list entry (the authors' non-stable
``argsort`` leaves them unspecified); zero tokens are normalised with ``eps`` (``F.normalize``)
instead of giving NaN. Steps of step 3 are computed in row chunks, which changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokencomp.base import Compressor
from tokencomp.kernels import batched_gather, selection_result
from tokencomp.kernels.attention import attention_scores, rank_descending
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context
from tokencomp.validation import check_float

# Tokens the authors remove per round of duplicate removal (``min(8, R - K_div)``).
_PER_ROUND = 8
# Rows of the [B, chunk, R/2] similarity block computed at once.
_CHUNK = 2048


def _max_similarity(a: torch.Tensor, b: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """Largest dot product ``[B, A]`` of each row of ``a`` ``[B, A, D]`` with the rows of ``b`` ``[B, B', D]``."""
    out = [(a[:, s : s + chunk] @ b.transpose(1, 2)).amax(dim=-1) for s in range(0, a.shape[1], chunk)]
    return torch.cat(out, dim=1)


@register("vispruner")
class VisPruner(Compressor):
    """Keep the top [CLS]-attention tokens, then the most mutually distinct of the rest.

    Parameters
    ----------
    important_ratio : float, default 0.5
        Share of the budget given to important (attention-selected) tokens, in ``[0, 1]``:
        ``K_imp = int(K * important_ratio)``. The authors' default is 0.5 (their MME example uses
        0.75 at 64 tokens).
    """

    stage = "pre_llm"
    needs_attention = True
    text_conditioned = False
    deterministic = True
    requires = ("cls_attention",)
    summary = "Top [CLS]-attention tokens plus diverse tokens kept by iterative duplicate removal."
    paper = (
        "Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning "
        "in VLMs (VisPruner), ICCV 2025"
    )

    def __init__(self, *, important_ratio: float = 0.5) -> None:
        self.important_ratio = check_float("vispruner", "important_ratio", important_ratio, low=0.0, high=1.0)

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        x = tokens.float()
        b, n, _ = x.shape
        attn = attention_scores("vispruner", context)
        k_imp = int(k * self.important_ratio)
        k_div = k - k_imp

        # 2. Important tokens; the residual list in decreasing attention.
        order = rank_descending(attn)
        important, residual = order[:, :k_imp], order[:, k_imp:]

        # 3. Iterative duplicate removal among the residual tokens.
        xn = F.normalize(x, dim=-1)
        while k_div > 0:
            r_len = residual.shape[1]
            r = min(_PER_ROUND, r_len - k_div)
            if r <= 0:
                break
            even, odd = residual[:, ::2], residual[:, 1::2]
            scores = _max_similarity(batched_gather(xn, even), batched_gather(xn, odd))
            keep = rank_descending(scores)[:, r:]  # drop the r most duplicated, keep score order
            residual = torch.cat([torch.gather(even, 1, keep), odd], dim=1)

        selected = torch.cat([important, residual], dim=1) if k_div > 0 else important
        indices = selected.sort(dim=-1).values
        is_imp = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, important, True)
        return selection_result(x, indices, important=torch.gather(is_imp, 1, indices))
