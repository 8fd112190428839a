"""What the checks assert about a result: its validity (one function for every check), bounds, spans."""

from __future__ import annotations

from typing import Optional

import torch

from ..base import Compressor
from ..kernels.gather import batched_gather
from ..types import CompressionResult

__all__ = ["assert_result_valid"]


def assert_result_valid(
    who: object,
    result: CompressionResult,
    tokens: torch.Tensor,
    k: int,
    *,
    selection: bool = False,
    finite_info: bool = False,
    what: str = "",
    ordered: Optional[bool] = None,
) -> None:
    """Assert that ``result`` is a valid compression of ``tokens`` ``[B, N, D]`` to ``k`` tokens per row.

    Shapes ``[B, K, D]``, ``[B, K]``, ``[B, N]``; ``indices`` and ``assignment`` int64 on the tokens'
    device; output tokens in the tokens' dtype and finite; ``indices`` in ``[0, N)``, unique in each row
    and, for a strategy in position order, strictly ascending; ``assignment`` in ``[-1, K)`` with
    ``assignment[indices[k]] == k``.

    Parameters
    ----------
    who : Compressor or str
        Named in the messages (a compressor by its ``repr``).
    result : CompressionResult
        A batched result.
    tokens : torch.Tensor
        The input ``[B, N, D]``.
    k : int
        Tokens kept per row.
    selection : bool
        Also assert that the outputs are the input tokens at ``indices``, exactly.
    finite_info : bool
        Also assert that every floating-point ``info`` tensor is finite (not on padded batches, whose
        per-token entries hold NaN at padding).
    what : str
        The input, for the messages (e.g. ``"zero tokens, K=4"``).
    ordered : bool, optional
        Whether ``indices`` must be strictly ascending; by default, when ``who`` is a compressor whose
        ``output_order`` is ``"position"`` (and always for a name).
    """
    if ordered is None:
        ordered = not isinstance(who, Compressor) or who.output_order == "position"
    who = repr(who) if isinstance(who, Compressor) else str(who)
    if what:
        who = f"{who}: {what}"
    _assert_layout(who, result, tokens, k)
    idx, a = result.indices, result.assignment
    n = tokens.shape[1]
    assert bool(((idx >= 0) & (idx < n)).all()), f"{who}: indices out of [0, {n}): {idx}"
    if ordered:
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), f"{who}: indices not strictly ascending: {idx}"
    else:
        ranked = idx.sort(dim=1).values
        assert bool((ranked[:, 1:] > ranked[:, :-1]).all()), f"{who}: indices not unique in each row: {idx}"
    assert bool(((a >= -1) & (a < k)).all()), f"{who}: assignment outside [-1, {k}): {a}"
    assert torch.equal(torch.gather(a, 1, idx), torch.arange(k, device=idx.device).expand_as(idx)), (
        f"{who}: assignment[indices[k]] must be k (a kept position maps to its own slot)"
    )
    assert bool(torch.isfinite(result.tokens.float()).all()), f"{who}: output tokens are not finite"
    if selection:
        assert torch.equal(result.tokens, batched_gather(tokens, idx)), (
            f"{who}: a selection's outputs are not the input tokens at indices"
        )
    if finite_info:
        for key, value in result.info.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert bool(torch.isfinite(value).all()), f"{who}: info[{key!r}] is not finite: {value}"


def _assert_layout(who: str, result: CompressionResult, tokens: torch.Tensor, k: int) -> None:
    """The shapes, dtypes and devices of ``result``."""
    b, n, d = tokens.shape
    got = {name: tuple(getattr(result, name).shape) for name in ("tokens", "indices", "assignment")}
    assert got["tokens"] == (b, k, d), f"{who}: tokens shape {got['tokens']} != {(b, k, d)}"
    assert got["indices"] == (b, k), f"{who}: indices shape {got['indices']} != {(b, k)}"
    assert got["assignment"] == (b, n), f"{who}: assignment shape {got['assignment']} != {(b, n)}"
    assert result.indices.dtype == torch.int64, f"{who}: indices dtype {result.indices.dtype}"
    assert result.assignment.dtype == torch.int64, f"{who}: assignment dtype {result.assignment.dtype}"
    assert result.tokens.dtype == tokens.dtype, f"{who}: {tokens.dtype} input gave {result.tokens.dtype} output"
    devices = {result.tokens.device, result.indices.device, result.assignment.device}
    assert devices == {tokens.device}, f"{who}: {tokens.device} input gave outputs on {devices}"


def span_fit(out: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares coefficients ``[B, K, V]`` of ``out`` ``[B, K, D]`` on ``vectors`` ``[B, V, D]`` and the
    residual norm of each output token relative to its own norm ``[B, K]`` (float64)."""
    o, a = out.double(), vectors.double()
    coef = torch.linalg.lstsq(a.transpose(1, 2), o.transpose(1, 2)).solution.transpose(1, 2)  # [B, K, V]
    residual = (o - coef @ a).norm(dim=-1)
    return coef, residual / o.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)


def assert_within_bounds(compressor: Compressor, out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Each coordinate of every output token lies between that coordinate's minimum and maximum over the
    input tokens of its batch row (a necessary condition of a convex combination), to float rounding."""
    o, xd = out.double(), x.double()
    lo, hi = xd.amin(dim=1, keepdim=True), xd.amax(dim=1, keepdim=True)
    tol = 1e-5 * xd.abs().amax(dim=(1, 2), keepdim=True)
    assert bool(((o >= lo - tol) & (o <= hi + tol)).all()), (
        f"{compressor!r}: on {what}, an output token leaves the coordinate range of the input tokens, so it is "
        "not a weighted average of them"
    )
