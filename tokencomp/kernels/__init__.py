"""Pure tensor kernels shared by several strategies (no model plumbing, batched over ``B``)."""

from .basis import PivotedQR, fps_indices, qr_pivot_indices, qr_pivots, random_indices
from .blocks import (
    BLOCK_ELEMENTS,
    GEMM_MIN,
    compute_dtype,
    gemm_pieces,
    norm_scale,
    pow2_scale,
    row_blocks,
    rows_matmul,
    scaled_norms,
    token_scale,
    unit_rows,
    unit_vectors,
)
from .gather import batched_gather, put_rows, selection_result, slots_of
from .lstsq import pivoted_ridge_errors, residual_errors, ridge_coefficients, ridge_errors, ridge_residual
from .matvec import column_dots, column_pieces, padded_columns, padded_rows, token_dots, token_dots_step
from .merge import cosine_match, mean_merge, merge_rows

__all__ = [
    "BLOCK_ELEMENTS",
    "PivotedQR",
    "GEMM_MIN",
    "batched_gather",
    "column_dots",
    "column_pieces",
    "compute_dtype",
    "cosine_match",
    "fps_indices",
    "gemm_pieces",
    "mean_merge",
    "merge_rows",
    "norm_scale",
    "padded_columns",
    "padded_rows",
    "pivoted_ridge_errors",
    "pow2_scale",
    "put_rows",
    "qr_pivot_indices",
    "qr_pivots",
    "random_indices",
    "residual_errors",
    "ridge_coefficients",
    "ridge_errors",
    "ridge_residual",
    "row_blocks",
    "rows_matmul",
    "scaled_norms",
    "selection_result",
    "slots_of",
    "token_dots",
    "token_dots_step",
    "token_scale",
    "unit_rows",
    "unit_vectors",
]
