"""``pooling``: 2-D average pooling of the token grid down to the budget, the spatial reference."""

from __future__ import annotations

import math

import torch

from tokencomp.base import Compressor
from tokencomp.errors import InputError
from tokencomp.kernels import compute_dtype, row_blocks
from tokencomp.registry import register
from tokencomp.types import CompressionResult, Context


def pooled_grid(k: int, h: int, w: int) -> tuple[int, int] | None:
    """The ``(h', w')`` with ``h' * w' = k``, ``h' <= h``, ``w' <= w`` closest to the aspect of ``(h, w)``.

    ``None`` when ``k`` has no such factorisation.
    """
    best = None
    for hp in range(1, h + 1):
        if k % hp or k // hp > w:
            continue
        cost = abs(math.log(hp / (k // hp)) - math.log(h / w))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, hp, k // hp)
    return None if best is None else (best[1], best[2])


def _bins(size: int, parts: int, device: torch.device) -> torch.Tensor:
    """Bin of each of ``size`` positions when split into ``parts`` contiguous near-equal bins."""
    return torch.arange(size, device=device) * parts // size


@register("pooling")
class GridPooling(Compressor):
    """Average the token grid over a ``h' x w'`` grid of non-overlapping cells with ``h' w' = K``.

    Row ``r`` of an ``h``-row grid falls in cell row ``floor(r * h' / h)`` (likewise for columns), so
    every input token belongs to exactly one cell and each output is the plain mean of its cell. When
    ``h`` is a multiple of ``h'`` and ``w`` of ``w'`` this equals ``torch.nn.functional.avg_pool2d``.
    The cell grid is the factorisation of ``K`` closest to the grid's aspect ratio; budgets without
    one that fits the grid raise ``ValueError`` naming the nearest valid budgets. Each output sits at
    the position of its cell's centre token. For a video grid ``(t, h, w)`` each frame is pooled
    alike, so ``K`` must be a multiple of ``t``.

    The grid comes from ``Context.grid``, or is ``sqrt(N) x sqrt(N)`` for a square ``N``.
    """

    stage = "pre_llm"
    deterministic = True
    summary = "2-D average pooling of the token grid to the budget (reference)."
    complexity = "O(N D)"
    scale_invariant = True
    padding = "unsupported"

    def _grid(self, n: int, context: Context) -> tuple[int, int, int]:
        if context.grid is not None:
            grid = tuple(context.grid)
            return (1, *grid) if len(grid) == 2 else grid  # type: ignore[return-value]
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(
                f"{self.display_name()}: needs the token grid; N={n} is not a square number, so pass "
                "tokencomp.Context(grid=(h, w)) or (t, h, w)."
            )
        return (1, side, side)

    def _cells(self, k: int, n: int, context: Context) -> tuple[int, int, int, int, int]:
        t, h, w = self._grid(n, context)
        cells = pooled_grid(k // t, h, w) if k % t == 0 else None
        if cells is None:
            valid = sorted({t * a * bb for a in range(1, h + 1) for bb in range(1, w + 1)})
            near = sorted(valid, key=lambda v: (abs(v - k), v))[:2]
            raise InputError(
                f"{self.display_name()}: budget K={k} cannot be laid out as a grid of cells on the {t}x{h}x{w} token "
                f"grid (K must be t * h' * w' with h' <= {h}, w' <= {w}); nearest valid budgets: "
                f"{', '.join(map(str, sorted(near)))}."
            )
        return t, h, w, cells[0], cells[1]

    def _check_budget(self, k: int, n: int, context: Context) -> None:
        self._cells(k, n, context)

    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        b, n, d = tokens.shape
        t, h, w, hp, wp = self._cells(k, n, context)
        dev = tokens.device
        row_bin, col_bin = _bins(h, hp, dev), _bins(w, wp, dev)
        frame = torch.arange(t, device=dev)
        # cell of every token, in row-major (frame, row, col) order
        cell = (frame[:, None, None] * hp + row_bin[None, :, None]) * wp + col_bin[None, None, :]
        cell = cell.reshape(-1)  # [N]
        ct = compute_dtype(tokens.dtype)
        sums = torch.zeros(b, k, d, dtype=ct, device=dev)
        for blk in row_blocks(b, n, d):  # half tokens are read in float32 blocks, never copied whole
            sums.index_add_(1, cell[blk], tokens[:, blk].to(ct))
        counts = torch.zeros(k, dtype=ct, device=dev).index_add_(0, cell, torch.ones(n, dtype=ct, device=dev))
        # centre token of every cell: middle row of its rows, middle column of its columns
        row_lo = torch.searchsorted(row_bin, torch.arange(hp, device=dev))
        row_hi = torch.searchsorted(row_bin, torch.arange(hp, device=dev), right=True)
        col_lo = torch.searchsorted(col_bin, torch.arange(wp, device=dev))
        col_hi = torch.searchsorted(col_bin, torch.arange(wp, device=dev), right=True)
        rc = (row_lo + row_hi - 1) // 2
        cc = (col_lo + col_hi - 1) // 2
        centre = (frame[:, None, None] * h + rc[None, :, None]) * w + cc[None, None, :]
        indices = centre.reshape(1, -1).expand(b, k).contiguous()
        return CompressionResult(
            tokens=sums / counts[None, :, None],
            indices=indices,
            assignment=cell.expand(b, n).contiguous(),
        )
