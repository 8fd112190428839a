"""Measurements of what a compression keeps, where, and at what cost; the ablation grid and its report.

- Information retention: :func:`recon_error`, :func:`lstsq_error`, :func:`pred_agreement` (a classifier
  head on pooled tokens) and, inside a VLM, next-token agreement and logit KL (:func:`run_vlm`).
- Positional bias: :func:`position_bias` (content shuffled over positions) and :func:`kept_heatmap`.
- FlashAttention compatibility, measured: :func:`run_vlm` runs each strategy under a forced
  FLASH_ATTENTION backend; :func:`attention_cost` times eager attention against SDPA.
- The modules, one job each: inputs (:mod:`.data` images, :mod:`.features` visual tokens, :mod:`.grid`
  the ablation's defaults, :mod:`.scenes` the grounded VQA benchmark's scenes and questions), metrics
  (:mod:`.retention`, :mod:`.prediction`, :mod:`.position`), measuring (:mod:`.measure`), the image-token
  grid (:mod:`.ablation`), the in-model runner (:mod:`.vlm` on :mod:`.tiny_vlm`; :mod:`.generate` on a
  real checkpoint), the kernel bench (:mod:`.bench`), saved rows (:mod:`.results`) and the report
  (:mod:`.tables`, :mod:`.plots`, :mod:`.report`).

The names below are imported on first use, so that ``import tokencomp.analysis.grid`` (the command
line's defaults) does not load scipy, matplotlib or the models.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the submodule that defines it.
_HOME = {
    "attention_cost": "vlm",
    "compare": "tables",
    "kept_heatmap": "position",
    "load_results": "results",
    "lstsq_error": "retention",
    "pooled": "prediction",
    "position_bias": "position",
    "pred_agreement": "prediction",
    "recon_error": "retention",
    "reconstruct": "retention",
    "run_vlm": "vlm",
    "save_results": "results",
    "write_report": "report",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
