"""Pure tensor kernels shared by several strategies (no model plumbing, batched over ``B``)."""

from .basis import fps_indices, qr_pivot_indices, random_indices
from .gather import batched_gather, selection_result, slots_of
from .lstsq import residual_errors, ridge_residual
from .merge import cosine_match, mean_merge

__all__ = [
    "batched_gather",
    "cosine_match",
    "fps_indices",
    "mean_merge",
    "qr_pivot_indices",
    "random_indices",
    "residual_errors",
    "ridge_residual",
    "selection_result",
    "slots_of",
]
