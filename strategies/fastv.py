"""FastV: drop the image tokens the last token attends to least, after an early LLM layer.

Paper: Chen et al., *An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models*, ECCV 2024 (arXiv 2403.06764).
Authors' code: ``pkunlp-icler/FastV`` (``src/transformers/models/llama/modeling_llama.py``, the
``use_fast_v`` branch of ``LlamaModel.forward``).

The algorithm, at prefill:

1. Run the decoder up to layer ``K`` (default 2) as usual.
2. Take the attention weights of layer ``K - 1`` from the **last** token of the sequence to every image
   token, averaged over heads.
3. Keep the ``R`` image tokens with the highest average attention (``topk``), in their original order;
   drop the rest (no merging). Later layers and decoding see only the kept tokens.

Here the attention row arrives as ``Context.text_attention`` (``[B, N]``, the last token's
head-averaged attention to the N visual tokens); the model integration extracts it, which needs eager
attention weights, so FastV cannot run under FlashAttention / SDPA.

Departures, all stated:

- **Pruned once, at prefill.** The authors' accuracy scripts
  (``src/FastV/inference/eval/eval_ocrvqa_fastv_token_mask.sh``, running ``inference_ocrvqa.py`` with
  ``use_cache=True``) use the *attention-mask* variant of ``LlamaModel.forward``
  (``src/transformers/src/transformers/models/llama/modeling_llama.py``, l. 763-808): at layer ``K`` of
  **every** forward pass, decoding steps included, it re-selects the ``R`` image tokens from the current
  last token's attention and masks the others in the layers after ``K``; every image token stays in the
  KV cache, so a token dropped at one step can return at the next. Ours, like their KV-cache variant
  (``src/FastV/lmms-eval/fastv_kvcache.py``, l. 118-130: pruning only when ``seq_length > 1``) and their
  in-place latency variant (``modeling_llama.py`` l. 729-760, ``--fast-v-inplace``, run without cache by
  ``eval_aokvqa_latency_fastv_inplace.sh``), prunes once at prefill: decoding sees the kept tokens only.
- Ties in attention go to the lower position (a stable descending sort, not ``topk``); batched over ``B``
  (the authors read batch row 0).
- Precision: ``compute_dtype="float32"`` (the default) ranks the float32 head average of the attention
  weights; the authors average the heads in the model's dtype (``torch.mean`` of the float16 weights in
  their evaluation), which rounds the average to half precision. Float32 is the default because the ranking
  then depends on the attention weights' values alone, not on the dtype the average is rounded to nor on a
  device's half-precision kernels: rounded to half precision (about three significant digits in float16, two
  in bfloat16), many of the 576 averages tie exactly, and a tie or a rounding step at the cut changes which
  tokens are kept. ``compute_dtype="input"`` reproduces the authors' arithmetic: it rounds the head average
  to the tokens' dtype, the model's (float16 / bfloat16; float32 ranks as the default). The integration
  supplies the float32 mean of the model's half-precision weights, and torch's half-precision mean
  accumulates in float32 and rounds once, so the rounded row is the authors' head average.
"""

from __future__ import annotations

import torch

from tokencomp.base import Compressor
from tokencomp.constraints import COMPUTE_DTYPE, Interval
from tokencomp.kernels import half_precision, selection_result
from tokencomp.kernels.attention import attention_scores, rank_descending
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context


@register("fastv")
class FastV(Compressor):
    """Keep the image tokens with the most attention from the last token at LLM layer ``layer``.

    Parameters
    ----------
    layer : int, default 2
        The decoder layer ``K`` after which the tokens are pruned (the authors' ``K = 2``): the
        attention row is that of layer ``K - 1``.
    compute_dtype : {"float32", "input"}, default "float32"
        The precision of the head-averaged attention row that ranks the tokens: ``"float32"`` whatever the
        model's dtype, or ``"input"``, rounded to the tokens' (hidden states') dtype when it is float16 /
        bfloat16, as the authors' head average in a half-precision model.

    Notes
    -----
    Ties in attention go to the lower position (a stable descending sort). ``info["scores"]`` holds the
    attention row used.
    """

    stage = "in_llm"
    needs_attention = True
    text_conditioned = True
    deterministic = True
    requires = ("text_attention",)
    summary = "Keep image tokens with most attention from the last token at LLM layer 2."
    complexity = "O(N log N)"
    scale_invariant = True
    info_layout = {"scores": "token"}
    paper = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv 2403.06764)"

    parameter_constraints = {"layer": (Interval(int, 1),), "compute_dtype": (COMPUTE_DTYPE,)}

    def __init__(self, *, layer: int = 2, compute_dtype: str = "float32") -> None:
        self.layer = layer
        self.compute_dtype = compute_dtype

    def llm_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        scores = attention_scores(context, "text_attention", dtype=half_precision(self.compute_dtype, tokens.dtype))
        top = rank_descending(scores)[:, :k]
        return selection_result(tokens, top.sort(dim=-1).values, scores=scores)
