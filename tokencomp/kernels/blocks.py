"""Row blocks: bounded-memory passes over ``[B, N, D]`` tokens, in the precision the maths needs.

Every kernel that would otherwise build a tensor of the input's size (a residual, a difference, a
similarity matrix) walks the token rows in blocks of at most :data:`BLOCK_ELEMENTS` elements, so its
extra memory stays constant as ``N`` grows (a 32-frame video has 18,432 tokens), and each block stays
in cache while several passes run over it. Tokens in half precision are read block by block into
float32 (:func:`compute_dtype`); they are never copied whole.
"""

from __future__ import annotations

from typing import Optional

import torch

# Float32 GEMMs with fewer rows or columns than this may run another BLAS kernel (MKL on CPU: another
# summation order, so the last bit of a product may differ from the same rows in a larger product).
GEMM_MIN = 12

# Elements of one working block (8 MiB in float32): large enough that the per-block overhead of a few
# operator calls is negligible, small enough to stay in a CPU's last-level cache.
BLOCK_ELEMENTS = 1 << 21


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths run in for tokens of ``dtype``: float32, or float64 for float64 tokens."""
    return torch.promote_types(dtype, torch.float32)


def row_blocks(batch: int, n: int, width: int, elements: Optional[int] = None) -> list[slice]:
    """Slices of ``range(n)`` such that a ``[batch, rows, width]`` block holds at most ``elements``.

    ``elements`` defaults to :data:`BLOCK_ELEMENTS` (read at call time). At least one row per block,
    whatever ``elements`` is.
    """
    limit = BLOCK_ELEMENTS if elements is None else elements
    rows = max(1, limit // max(1, batch * width))
    return [slice(start, min(n, start + rows)) for start in range(0, n, rows)]


def rows_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` in ``w``'s dtype without copying ``x`` whole into that dtype.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.
    w : torch.Tensor
        ``[B, D, C]``, usually in :func:`compute_dtype` of ``x`` (float32 to read half or float64
        tokens in float32, block by block).

    Returns
    -------
    torch.Tensor
        ``[B, N, C]`` in ``w``'s dtype.
    """
    ct = w.dtype
    if x.dtype == ct:
        return torch.bmm(x, w)
    b, n, d = x.shape
    out = torch.empty(b, n, w.shape[2], dtype=ct, device=x.device)
    for blk in row_blocks(b, n, d):
        out[:, blk] = torch.bmm(x[:, blk].to(ct), w)
    return out


def unit_rows(tokens: torch.Tensor) -> torch.Tensor:
    """``F.normalize(tokens.float(), dim=-1)`` (the same values), built row block by row block.

    Half-precision tokens are read into float32 one block at a time, so the only full-size tensor is
    the float32 result.
    """
    b, n, d = tokens.shape
    out = torch.empty(b, n, d, dtype=torch.float32, device=tokens.device)
    for blk in row_blocks(b, n, d):
        rows = tokens[:, blk].float()
        torch.div(rows, rows.norm(dim=-1, keepdim=True).clamp_min(1e-12), out=out[:, blk])
    return out


def gemm_pieces(rows: slice, chunk: int, limit: int) -> list[slice]:
    """The chunks of ``chunk`` rows in ``rows``, each split into pieces of about ``limit`` rows.

    A chunk is split only into pieces of at least :data:`GEMM_MIN` rows (the remainder joins the last
    piece), so every piece's product computes its values exactly as the whole chunk's product would:
    for strategies whose reference multiplies in chunks and must be reproduced bit for bit, while the
    memory of one piece stays bounded.
    """
    out = []
    step = max(limit, GEMM_MIN)
    for start in range(rows.start, rows.stop, chunk):
        stop = min(rows.stop, start + chunk)
        while stop - start >= step + GEMM_MIN:
            out.append(slice(start, start + step))
            start += step
        out.append(slice(start, stop))
    return out
