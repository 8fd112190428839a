"""What ``tokencomp ablate`` runs when not told otherwise: budgets, feature sets, views, grids, seed, focus.

Light on purpose (no scipy, plotting or model code), so that the command line reads its defaults from here
without loading the analysis.
"""

from __future__ import annotations

from typing import Any

from tokencomp.analysis.features import FEATURES

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_FEATURES",
    "DEFAULT_FOCUS",
    "DEFAULT_GRIDS",
    "DEFAULT_QUESTIONS",
    "DEFAULT_SEED",
    "DEFAULT_VIEWS",
    "VIEWS",
]

DEFAULT_BUDGETS: tuple[int, ...] = (64, 128, 192)
# Every built-in feature set.
DEFAULT_FEATURES: tuple[str, ...] = FEATURES
# Views of each image for feature sets with a classifier head (pred_agreement's samples).
VIEWS: tuple[str, ...] = ("full", "flip", "crop", "crop-tl", "crop-br")
DEFAULT_VIEWS: tuple[str, ...] = ("full", "flip", "crop-tl", "crop-br")
# ApET's variant grid (basis x error norm) runs by default; other strategies run with their defaults.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "apet": {"basis": ["fps", "qr", "random"], "error_norm": ["l2", "l1", "linf", "relative"]},
}
DEFAULT_SEED = 0
# scenes test questions mini-llava answers per cell (fewer for some strategies: tokencomp.analysis.vqa)
DEFAULT_QUESTIONS = 60
# The strategy report.md compares with the references.
DEFAULT_FOCUS = "apet"
