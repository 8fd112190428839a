"""The product of every token with one vector per batch row, at the speed memory allows.

Greedy selections (DivPrune's max-min picks, the pivoted QR basis) multiply all ``N`` tokens by one
vector per step: a pass over ``B N D`` floats that moves far more memory than it computes, so its
time is the time the BLAS takes to read the tokens. On CPU that depends on how the product is put:

- ``x @ v`` (``torch.bmm`` of ``[B, N, D]`` by ``[B, D, 1]``, MKL's ``gemv``) reads at about 17 GB/s
  on the 2-core AMD EPYC of our benchmarks for one batch row (one core), and 7 GB/s for 16 rows;
- ``v^T @ x^T`` (``[B, 1, D]`` by the transposed view of the same rows, no copy) with the rows cut
  into pieces of at most :data:`PIECE_ROWS` tokens multiplied as one batched product reads at 40-50
  GB/s: PyTorch runs the pieces on all threads. Twice to three times faster at one batch row, five
  times at sixteen.

:func:`token_dots` computes the second. The pieces are ``ceil(N' / PIECE_ROWS)`` equal views of
``N' / pieces`` rows, a multiple of :data:`PIECE_ALIGN`; the caller pads the tokens with zero rows
to :func:`padded_rows` ``(N)`` (for instance :func:`~tokencomp.kernels.blocks.unit_rows` with
``rows=``). The pieces depend on ``N`` only, not on the number of threads, so the values (the
summation order of each dot product) are the same on any machine with the same BLAS.
"""

from __future__ import annotations

import torch

# Largest piece, in rows (1 MiB of float32 tokens of 1024 channels: fits a core's L2 cache).
PIECE_ROWS = 256
# Every piece's rows are a multiple of this (MKL computes the last rows of a piece that is not by
# another kernel; aligned pieces start on a 64-byte boundary).
PIECE_ALIGN = 16


def padded_rows(n: int) -> int:
    """Rows ``N' >= n`` that :func:`token_dots` takes: ``ceil(n / PIECE_ROWS)`` pieces of equal rows, each a
    multiple of :data:`PIECE_ALIGN` (at most ``PIECE_ALIGN - 1`` padding rows per piece).

    ``padded_rows(padded_rows(n)) == padded_rows(n)``.
    """
    pieces = max(1, -(-n // PIECE_ROWS))
    return pieces * PIECE_ALIGN * -(-n // (PIECE_ALIGN * pieces))


def token_dots(x: torch.Tensor, vectors: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = x[b, i] . vectors[b]`` by pieces (module notes); returns ``out``.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N', D]`` contiguous rows with ``N' = padded_rows(N')`` (pad with zero rows).
    vectors : torch.Tensor
        ``[B, D]``, the dtype of ``x``.
    out : torch.Tensor
        ``[B, N']`` contiguous, the dtype of ``x``.
    """
    b, rows, d = x.shape
    if padded_rows(rows) != rows:
        raise ValueError(f"token_dots: {rows} rows cannot be cut into equal aligned pieces; pad the tokens with "
                         f"zero rows to padded_rows({rows}) = {padded_rows(rows)}.")
    pieces = max(1, -(-rows // PIECE_ROWS))
    m = rows // pieces
    left = vectors.view(b, 1, 1, d).expand(b, pieces, 1, d).reshape(b * pieces, 1, d)
    torch.bmm(left, x.view(b * pieces, m, d).transpose(1, 2), out=out.view(b * pieces, 1, m))
    return out
