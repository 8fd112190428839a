"""Row blocks: bounded-memory passes over ``[B, N, D]`` tokens, in the precision the maths needs.

Every kernel that would otherwise build a tensor of the input's size (a residual, a difference, a
similarity matrix) walks the token rows in blocks of at most :data:`BLOCK_ELEMENTS` elements, so its
extra memory stays constant as ``N`` grows (a 32-frame video has 18,432 tokens), and each block stays
in cache while several passes run over it. Tokens in half precision are read block by block into
float32 (:func:`compute_dtype`); they are never copied whole.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tokencomp.errors import InputError

# Float32 GEMMs with fewer rows or columns than this may run another BLAS kernel (MKL on CPU: another
# summation order, so the last bit of a product may differ from the same rows in a larger product).
GEMM_MIN = 12

# Elements of one working block (8 MiB in float32): large enough that the per-block overhead of a few
# operator calls is negligible, small enough to stay in a CPU's last-level cache.
BLOCK_ELEMENTS = 1 << 21


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths run in for tokens of ``dtype``: float32, or float64 for float64 tokens."""
    return torch.promote_types(dtype, torch.float32)


# The half-precision dtypes a strategy's ``compute_dtype="input"`` computes in (its authors' arithmetic in a
# float16 / bfloat16 model); inputs of any other dtype keep the float32 maths.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def half_precision(choice: str, dtype: torch.dtype) -> Optional[torch.dtype]:
    """The half-precision dtype a strategy's ``compute_dtype`` parameter asks for on inputs of ``dtype``.

    Parameters
    ----------
    choice : {"float32", "input"}
        The strategy's ``compute_dtype``.
    dtype : torch.dtype
        The dtype of the inputs the computation reads.

    Returns
    -------
    torch.dtype or None
        ``dtype`` when ``choice`` is ``"input"`` and ``dtype`` is float16 or bfloat16 (compute as the authors
        do, in the inputs' dtype); ``None`` otherwise: the strategy's float32 maths, unchanged (float32 and
        float64 inputs give the same result with either choice).
    """
    return dtype if choice == "input" and dtype in HALF_DTYPES else None


def divide_by_norm(rows: torch.Tensor) -> torch.Tensor:
    """``rows / rows.norm(dim=-1, keepdim=True)`` in ``rows``' own dtype: the authors' normalisation, literally.

    In half precision this rounds the norm and the quotient to that precision, as the authors' code does in
    a float16 model (:func:`unit_vectors` normalises in float32 after a power-of-two scaling instead). Zero
    rows stay zero (the authors' code gives NaN there); every other row has exactly the authors' values.
    """
    norms = rows.norm(dim=-1, keepdim=True)
    return rows / norms.masked_fill(norms == 0, 1)


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


def pow2_scale(values: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """A power of two ``2**-e`` per slice along ``dim`` that brings the slice's largest absolute value into
    ``[0.5, 1)`` (``dim`` kept, in :func:`compute_dtype`; 1 for an all-zero slice).

    Multiplying by a power of two is exact, so norms, dot products, distances and cosines of the scaled
    values are those of ``values`` times powers of two, bit for bit wherever neither overflows nor
    underflows, while for the scaled values none can: the squared norm of a float32 token of size
    ``1e30`` is infinite, that of a token of size ``1e-30`` zero. For subnormal slices ``e`` stops at
    the dtype's smallest normal exponent, so the factor stays finite. Two reductions over ``values``
    (their minimum and maximum), no temporary of their size.
    """
    ct = compute_dtype(values.dtype)
    # amin and amax, not aminmax (many times slower on CPU) nor abs().amax (a temporary)
    low, high = values.amin(dim=dim, keepdim=True), values.amax(dim=dim, keepdim=True)
    largest = torch.maximum(high.to(ct), -low.to(ct))
    floor = math.frexp(torch.finfo(ct).tiny)[1]  # the smallest normal exponent
    return torch.exp2(-torch.frexp(largest)[1].clamp_min(floor).to(ct))


def token_scale(x: torch.Tensor) -> torch.Tensor:
    """:func:`pow2_scale` over each batch row of tokens ``[B, N, D]``: ``[B, 1, 1]``, one factor for all of a
    row's tokens, so that distances and products between them keep their ratios."""
    return pow2_scale(x, dim=(1, 2))


# Largest token norm of a batch row for which :func:`norm_scale` is trusted: the squares of norms in
# this range neither overflow nor underflow in float32 (nor do those of the row's entries that matter).
SAFE_NORMS = (2.0**-40, 2.0**60)


def norm_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token norms computed directly, a power of two per batch row from them, and whether to trust them.

    One pass over the tokens (where :func:`token_scale` and the norms of the scaled tokens take three)
    and no host synchronisation. For a batch row whose largest norm lies in :data:`SAFE_NORMS` the
    norms are those of the tokens scaled by any power of two, scaled back (the squares neither
    overflow nor underflow), so a caller can use them with the returned scale instead of
    :func:`token_scale`; elsewhere (tokens of size ``1e30`` or ``1e-30``, all-zero tokens, NaN or
    infinite values) ``ok`` is ``False`` and the caller must take that path.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N, D]`` tokens, any float dtype.

    Returns
    -------
    tuple of torch.Tensor
        ``norms`` ``[B, N]`` in :func:`compute_dtype`; ``scale`` ``[B, 1, 1]``, the power of two that
        brings the largest norm into ``[0.5, 1)``; ``ok`` ``[B]`` bool.
    """
    ct = compute_dtype(x.dtype)
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=ct)
    largest = norms.amax(dim=-1)
    ok = (largest >= SAFE_NORMS[0]) & (largest <= SAFE_NORMS[1])  # False for NaN and infinity
    return norms, torch.exp2(torch.frexp(largest)[1].neg_().to(ct)).view(-1, 1, 1), ok


def scaled_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N]`` float32 Euclidean norms of the rows of ``x`` ``[B, N, D]`` each scaled by a power of two, and
    those powers.

    The norm of row ``n`` is ``norms[n] / scale[n]`` (:func:`pow2_scale`: the squares of a row of size
    ``1e30`` do not overflow, nor those of size ``1e-30`` vanish). Row block by row block, so
    half-precision rows are never copied whole to float32.
    """
    b, n, d = x.shape
    norms = torch.empty(b, n, dtype=torch.float32, device=x.device)
    scale = torch.empty(b, n, dtype=torch.float32, device=x.device)
    for blk in row_blocks(b, n, d):
        rows = x[:, blk].float()
        f = pow2_scale(rows)
        norms[:, blk] = torch.linalg.vector_norm(rows * f, dim=-1)
        scale[:, blk] = f.squeeze(-1)
    return norms, scale


def unit_vectors(
    rows: torch.Tensor, dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``F.normalize(rows, dim=-1)`` in ``dtype`` (the same values), of the rows first scaled by a power of two.

    The scaling (:func:`pow2_scale`, applied before rounding to ``dtype``) gives the same unit vectors, but
    the norm neither overflows for huge rows nor underflows for tiny ones, and the ``1e-12`` floor of
    ``F.normalize`` applies to zero rows only (a tiny nonzero row keeps its direction). Computed in
    ``out`` (fresh when not given) in place: no temporary of the rows' size unless ``rows`` are float64
    and ``dtype`` is not.
    """
    if out is None:
        out = torch.empty(rows.shape, dtype=dtype, device=rows.device)
    if compute_dtype(rows.dtype) != dtype:  # float64 rows: scaled before rounding, which might overflow
        out.copy_(rows * pow2_scale(rows))
    else:
        out.copy_(rows)
        out.mul_(pow2_scale(out))
    return torch.div(out, out.norm(dim=-1, keepdim=True).clamp_min(1e-12), out=out)


def unit_rows(tokens: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """``F.normalize(tokens.float(), dim=-1)`` (the same values, :func:`unit_vectors`), row block by row block.

    Half-precision tokens are read into float32 one block at a time, so the only full-size tensor is
    the float32 result. With ``rows`` (at least ``N``) the result has that many rows, the last
    ``rows - N`` zero (the padding :func:`~tokencomp.kernels.matvec.token_dots` needs).
    """
    b, n, d = tokens.shape
    total = n if rows is None else rows
    if total < n:
        raise InputError(f"unit_rows: rows={rows} is fewer than the {n} tokens; give at least {n}.")
    out = torch.empty(b, total, d, dtype=torch.float32, device=tokens.device)
    out[:, n:] = 0.0
    for blk in row_blocks(b, n, d):
        unit_vectors(tokens[:, blk], out=out[:, blk])
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
