"""The product of every token with one vector per batch row, at the speed memory allows.

Greedy selections (DivPrune's max-min picks, the pivoted QR basis) multiply all ``N`` tokens by one
vector per step: a pass over ``B N D`` floats that moves far more memory than it computes, so its
time is the time the BLAS takes to read the tokens. On CPU that depends on how the product is put:

- ``x @ v`` (``torch.bmm`` of ``[B, N, D]`` by ``[B, D, 1]``, MKL's ``gemv``);
- ``v^T @ x^T`` (``[B, 1, D]`` by the transposed view of the same rows, no copy) with the rows cut
  into pieces of at most :data:`PIECE_ROWS` tokens multiplied as one batched product, which PyTorch
  runs on all threads.

``python benchmarks/token_dots.py`` times both. For a batch of 16 images the second is about twice
as fast on the Intel Xeon of our current figures (52 against 29 GB/s) and was ten times as fast on
the AMD EPYC of earlier ones; for one image, MKL's ``gemv`` reads at 17 GB/s on that EPYC (one core)
against 36-100 GB/s for the pieces, but as fast as the pieces on the Xeon (55 GB/s from main memory).
The pieces also make the values independent of the number of threads.

:func:`token_dots` computes the second. The pieces are equal views of at most :data:`PIECE_ROWS`
rows, a multiple of :data:`PIECE_ALIGN`, and their number a multiple of :data:`PIECE_GROUP` (so 2 or
4 threads share them evenly; 3 pieces on 2 threads take 1.4x the time of 4); the caller pads the
tokens with zero rows to :func:`padded_rows` ``(N)`` (for instance
:func:`~tokencomp.kernels.blocks.unit_rows` with ``rows=``). The pieces depend on ``N`` only, not on
the number of threads, so the values (the summation order of each dot product) are the same with one
thread as with many.

Tokens stored as columns (``[B, D, N]``, CDPruner's layout) have their own form,
:func:`column_dots`: for one batch row on CPU the columns are cut into :func:`column_pieces`
(:data:`PIECE_GROUP`) strided pieces multiplied as one batched product. Each thread streams ``D`` rows
of its columns rather than taking one dot product at a time (on the EPYC the fastest read from main
memory, 55 GB/s; on the Xeon as fast as the others), but it needs a transposed copy of the tokens,
which costs more than a pass over them. Every piece is a multiple of :data:`PIECE_ALIGN` columns wide.

The values (the summation order of each dot product) are fixed by the shapes of the products, which
depend on ``N`` and ``B`` only, never on the number of threads: a result is the same with one thread as
with many on the same machine. They are not the same across shapes: MKL picks its kernel by shape and
CPU, so the same dot product computed in a batch of images, alone, or in pieces of another width may
differ in the last bit (seen on an Intel Xeon; on an AMD EPYC the piece widths gave equal values).
"""

from __future__ import annotations

from typing import Callable

import torch

from tokencomp.errors import InputError

# Largest piece, in rows (1 MiB of float32 tokens of 1024 channels: fits a core's L2 cache).
PIECE_ROWS = 256
# The number of pieces is a multiple of this.
PIECE_GROUP = 4
# Every piece's rows are a multiple of this (MKL computes the last rows of a piece that is not by
# another kernel; aligned pieces start on a 64-byte boundary).
PIECE_ALIGN = 16


def padded_rows(n: int) -> int:
    """Rows ``N' >= n`` that :func:`token_dots` takes: :func:`pieces` ``(n)`` pieces of equal rows, each a
    multiple of :data:`PIECE_ALIGN` (at most ``PIECE_ALIGN - 1`` padding rows per piece beyond the
    first ``n``).

    ``padded_rows(padded_rows(n)) == padded_rows(n)``.
    """
    count = pieces(n)
    return count * PIECE_ALIGN * -(-n // (PIECE_ALIGN * count))


def pieces(n: int) -> int:
    """Pieces for ``n`` rows: the first multiple of :data:`PIECE_GROUP` with at most :data:`PIECE_ROWS` rows each."""
    return PIECE_GROUP * max(1, -(-n // (PIECE_GROUP * PIECE_ROWS)))


def token_dots(x: torch.Tensor, vectors: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = x[b, i] . vectors[b]`` by pieces (module notes); returns ``out``.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, N', D]`` contiguous rows with ``N' = padded_rows(N')`` (pad with zero rows).
    vectors : torch.Tensor
        ``[B, D]`` contiguous, the dtype of ``x``.
    out : torch.Tensor
        ``[B, N']`` contiguous, the dtype of ``x``.
    """
    token_dots_step(x, vectors, out)()
    return out


def token_dots_step(x: torch.Tensor, vectors: torch.Tensor, out: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function of no arguments that computes :func:`token_dots` ``(x, vectors, out)`` on the current contents
    of the three tensors.

    The views of the pieces are built once: a greedy loop that rewrites ``vectors`` (and ``x``) in place
    each step calls the function for one operator call per step, the same values as :func:`token_dots`.
    Arguments as for :func:`token_dots`.
    """
    b, rows, d = x.shape
    if padded_rows(rows) != rows:
        raise InputError(
            f"token_dots: {rows} rows cannot be cut into equal aligned pieces; pad the tokens with "
            f"zero rows to padded_rows({rows}) = {padded_rows(rows)}."
        )
    count = pieces(rows)
    m = rows // count
    # the vector once per piece, a stride-0 view: for one batch row bmm reads it without a copy; for a
    # batch matmul copies it into [B * pieces, 1, D] per call
    left = vectors.view(b, 1, 1, d).expand(b, count, 1, d)
    if b == 1:
        left, right, result = left[0], x.view(count, m, d).transpose(1, 2), out.view(count, 1, m)
        return lambda: torch.bmm(left, right, out=result)
    right, result = x.view(b, count, m, d).transpose(2, 3), out.view(b, count, 1, m)
    return lambda: torch.matmul(left, right, out=result)


def column_pieces(batch: int, device: torch.device) -> int:
    """Pieces :func:`column_dots` cuts ``[D, N]`` columns into: :data:`PIECE_GROUP` for one batch row on CPU
    (2 or 4 threads share them evenly; not the thread count, so the values do not depend on it), else 1
    (a batch runs its rows in parallel; on a GPU one product fills the device)."""
    return PIECE_GROUP if batch == 1 and torch.device(device).type == "cpu" else 1


def padded_columns(n: int, pieces: int) -> int:
    """Columns ``N' >= n`` that :func:`column_dots` takes with ``pieces``: the first multiple of
    ``PIECE_ALIGN * pieces``."""
    step = PIECE_ALIGN * pieces
    return -(-n // step) * step


def column_dots(columns: torch.Tensor, vectors: torch.Tensor, pieces: int, out: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = vectors[b] . columns[b, :, i]``; returns ``out``.

    Parameters
    ----------
    columns : torch.Tensor
        ``[B, D, N']`` contiguous, ``N' = padded_columns(N', pieces)`` (pad with zero columns).
    vectors : torch.Tensor
        ``[B, D]``, the dtype of ``columns``.
    pieces : int
        :func:`column_pieces` of ``B`` (1 when ``B > 1``).
    out : torch.Tensor
        ``[B, N']`` contiguous, the dtype of ``columns``.
    """
    b, d, width = columns.shape
    if width % (PIECE_ALIGN * pieces) or (pieces > 1 and b > 1):
        raise InputError(
            f"column_dots: {width} columns of {b} batch rows cannot be cut into {pieces} aligned "
            f"pieces; pad to padded_columns({width}, pieces) and use pieces=1 for a batch."
        )
    if pieces == 1:
        torch.bmm(vectors.unsqueeze(1), columns, out=out.view(b, 1, width))
        return out
    m = width // pieces
    mats = columns.view(d, pieces, m).permute(1, 0, 2)  # [P, D, m] strided views, row stride N'
    torch.bmm(vectors.view(1, 1, d).expand(pieces, 1, d), mats, out=out.view(pieces, 1, m))
    return out
