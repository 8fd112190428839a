"""PyramidDrop: rank image tokens by one attention row computed from a layer's query and keys.

Paper: Xing et al., *PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction*, CVPR 2025 (arXiv 2410.17247). Authors' code: ``Cooperx521/PyramidDrop``
(``llava/model/modeling_llama_pdrop.py``, ``pdrop_forward`` and ``pdrop_rank_drop``).

The algorithm, at prefill (their defaults are ours):

1. The decoder is split into stages at layers ``layers = [8, 16, 24]``; at the end of each stage the
   image tokens are cut to ``ratio = 0.5`` of those that entered it (``int(n * ratio)``), so the four
   stages see 576, 288, 144 and 72 image tokens.
2. At a stage boundary ``l`` (the hidden states leaving layer ``l - 1``), the next layer's
   ``input_layernorm``, ``q_proj`` and ``k_proj`` and rotary embedding give the **last instruction
   token's** query and every prompt token's keys; its attention row is ``softmax(q K^T / sqrt(Dh))``
   over the whole causal prefix (in float32), averaged over heads.
3. The image part of that row ranks the image tokens; the ``k`` with the highest attention are kept
   in their original order (``topk``, then sorted), the rest dropped, without merging.
4. Positions (``positions = "renumber"``, the authors' bookkeeping): after each cut the later layers
   number the shorter sequence ``0 .. L' - 1`` (``pdrop_rank_drop`` rebuilds ``position_ids`` as
   ``arange(cur_len)`` per row), so the next boundary's query and keys are rotated at the renumbered
   positions too; in each decoding step every boundary shifts the step's position down by the tokens
   it dropped (``pdrop_forward``), so the first generated token sits at the prompt length minus every
   drop so far, right after the renumbered prompt.

One row is computed by hand, never the full attention matrix, so PyramidDrop runs beside FlashAttention
/ SDPA: ``needs_attention`` is False. The model integration supplies ``Context.query`` ``[B, H, Dh]``,
``Context.keys`` ``[B, H, L, Dh]`` (heads repeated for grouped-query attention), the visual tokens'
``Context.visual_positions`` ``[B, N]`` among the keys and, for padded prompts, ``Context.key_mask``.
One call of :meth:`compress` is one stage boundary; ``layers`` and ``ratio`` are the schedule the
integration runs (:meth:`stage_budgets`).

Departures from the authors' code:

- ``positions="keep"`` (not the default) keeps every kept token's original position id in later layers
  and decoding instead of renumbering; the authors always renumber.
- Batches: the authors handle right-padded rows one at a time and renumber each row's valid tokens from
  0; the model integration runs the batch at once and moves each kept token down by the tokens dropped
  before it, which gives every valid token the same renumbered position (padding is never dropped, so a
  left-padded row keeps whatever positions the model gives its pads).
- Schedule: the authors take a list of ratios (``image_token_ratio_list``, ``[0.5, 0.25, 0.125]``); we
  take one ``ratio`` and its powers, the same list for the paper's setting.
- Only the authors' inference branch: the query is the prompt's last token (in training they use every
  token before an answer). Ties go to the lower position (``topk`` leaves them unspecified).
- Precision: ``compute_dtype="float32"`` (the default) computes the attention row in float32 whatever the
  query's and keys' dtype; the authors compute ``q K^T / sqrt(Dh)`` in the model's dtype (float16 in their
  evaluation), take the softmax in float32, cast it back to that dtype and average the heads in it. Float32
  is the default because the ranking then depends on the query's and keys' values alone, not on the dtype
  they are stored in nor on a device's half-precision kernels: attention weights rounded to half precision
  (about three significant digits in float16, two in bfloat16) tie exactly far more often, and a tie or a
  rounding step at the cut changes which tokens are kept. ``compute_dtype="input"`` reproduces the authors'
  arithmetic in the tokens' dtype, the model's (float16 / bfloat16; float32 computes as the default): the
  query and keys are cast to it, which is exact for the integration's float32 copies of the model's
  projections.
- On an M-RoPE decoder (Qwen2-VL) the integration keeps the 3-D positions whatever ``positions`` says:
  renumbering a 3-D layout has no single meaning, and the authors' code is LLaVA's 1-D one.
"""

from __future__ import annotations

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import COMPUTE_DTYPE, Interval, ListOf, Options
from tokencomp.kernels import half_precision, selection_result
from tokencomp.kernels.attention import attention_row, rank_descending
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context

POSITIONS = ("renumber", "keep")


@register("pdrop")
class PyramidDrop(Compressor):
    """Keep the image tokens the last instruction token attends to most, from its own query and keys.

    Parameters
    ----------
    layers : list of int, default [8, 16, 24]
        Stage boundaries: the decoder layers after which a cut happens (strictly increasing, >= 1).
    ratio : float, default 0.5
        Fraction of the image tokens entering a stage that survive its boundary, in (0, 1].
    positions : {"renumber", "keep"}, default "renumber"
        Position ids after a cut: ``"renumber"`` (the authors') numbers the shorter sequence
        ``0 .. L' - 1`` in later layers and shifts every decoding step down by the tokens dropped;
        ``"keep"`` keeps the kept tokens' original positions (decoding continues from the prompt length).
        Read by the model integration through :attr:`in_llm_positions`.
    compute_dtype : {"float32", "input"}, default "float32"
        The precision of the attention row: ``"float32"`` whatever the model's dtype, or ``"input"``, the
        tokens' (hidden states') dtype when it is float16 / bfloat16 (the authors' arithmetic in a
        half-precision model: ``q K^T / sqrt(Dh)`` in it, the softmax in float32 cast back to it, the head
        average in it).

    Notes
    -----
    Ties in attention go to the lower position. ``info["scores"]`` holds the attention row of the
    visual tokens used for the ranking.
    """

    stage = "in_llm"
    needs_attention = False
    text_conditioned = True
    deterministic = True
    requires = ("query", "keys", "visual_positions")
    summary = "Pyramid of cuts at LLM layers 8/16/24, ranking by the last instruction token's q/k attention."
    complexity = "O(L H Dh + N log N)"
    scale_invariant = True
    info_layout = {"scores": "token"}
    paper = "Xing et al., PyramidDrop, CVPR 2025 (arXiv 2410.17247)"

    parameter_constraints = {
        "layers": (ListOf(Interval(int, 1), increasing=True),),
        "ratio": (Interval(float, 0.0, 1.0, closed="right"),),
        "positions": (Options(POSITIONS),),
        "compute_dtype": (COMPUTE_DTYPE,),
    }

    def __init__(
        self,
        *,
        layers: list[int] = (8, 16, 24),  # type: ignore[assignment]
        ratio: float = 0.5,
        positions: str = "renumber",
        compute_dtype: str = "float32",
    ) -> None:
        self.layers = layers
        self.ratio = ratio
        self.positions = positions
        self.compute_dtype = compute_dtype

    @property
    def in_llm_positions(self) -> str:  # type: ignore[override]
        """Per instance: ``positions`` (``"renumber"`` by default, as the authors)."""
        return self.positions

    def llm_layers(self) -> tuple[int, ...]:
        """The stage boundaries, ``layers``."""
        return tuple(self.layers)

    def stage_budgets(self, n: int) -> list[int]:
        """Image tokens kept after each boundary of ``layers``, starting from ``n`` (``int(n * ratio^s)``)."""
        return [int(n * self.ratio ** (s + 1)) for s in range(len(self.layers))]

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        # the model's dtype: the integration hands over float32 copies of its half-precision query and keys
        half = half_precision(self.compute_dtype, tokens.dtype)
        row = attention_row(context.query, context.keys, context.key_mask, dtype=half)  # [B, L]
        scores = torch.gather(row, 1, context.visual_positions)  # [B, N]
        keep = rank_descending(scores)[:, :k]
        return selection_result(tokens, keep.sort(dim=-1).values, scores=scores)
