"""Measurements of what a compression keeps (information retention; more views come with the analysis issue)."""

from .prediction import pooled, pred_agreement
from .retention import lstsq_error, reconstruct, recon_error

__all__ = ["lstsq_error", "pooled", "pred_agreement", "recon_error", "reconstruct"]
