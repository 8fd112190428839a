"""Measurements of what a compression keeps, where, and at what cost; the ablation grid and its report.

- Information retention: :func:`recon_error`, :func:`lstsq_error`, :func:`pred_agreement` (a classifier
  head on pooled tokens) and, inside a VLM, next-token agreement and logit KL (:func:`run_vlm`).
- Positional bias: :func:`position_bias` (content shuffled over positions) and :func:`kept_heatmap`.
- FlashAttention compatibility, measured: :func:`run_vlm` runs each strategy under a forced
  FLASH_ATTENTION backend; :func:`attention_cost` times eager attention against SDPA.
- The grid behind ``tokencomp ablate`` (:mod:`.ablation`), its saved results (:mod:`.results`) and
  ``report.md`` with plots (:func:`write_report`).
"""

from .position import kept_heatmap, position_bias
from .prediction import pooled, pred_agreement
from .report import compare, write_report
from .results import load_results, save_results
from .retention import lstsq_error, recon_error, reconstruct
from .vlm import attention_cost, run_vlm

__all__ = [
    "attention_cost",
    "compare",
    "kept_heatmap",
    "load_results",
    "lstsq_error",
    "pooled",
    "position_bias",
    "pred_agreement",
    "recon_error",
    "reconstruct",
    "run_vlm",
    "save_results",
    "write_report",
]
