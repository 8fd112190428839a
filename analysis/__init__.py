"""Measurements of what a compression keeps (information retention; more views come with the analysis issue)."""

from .retention import lstsq_error, reconstruct, recon_error

__all__ = ["lstsq_error", "recon_error", "reconstruct"]
