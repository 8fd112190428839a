"""Measurements of what a compression keeps (information retention; more views come with the analysis issue)."""

from .position import kept_heatmap, position_bias
from .prediction import pooled, pred_agreement
from .retention import lstsq_error, reconstruct, recon_error

__all__ = ["kept_heatmap", "lstsq_error", "pooled", "position_bias", "pred_agreement", "recon_error", "reconstruct"]
