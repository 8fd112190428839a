"""Padded batches: compress each row on its valid tokens only.

A padded batch marks its padding with ``Context.valid`` ``[B, N]`` (``False`` at padding). A strategy
whose :attr:`~tokencomp.Compressor.padding` is ``"rows"`` (the default) never sees the padding: the
rows are grouped by their number of valid tokens ``n_b``, each group's valid tokens (in position order)
are compressed as an ordinary ``[rows, n_b, D]`` batch, and the results are mapped back to the padded
positions. So padding is never kept, never merged into and never influences the other tokens, and
each row's result equals compressing its valid tokens alone (for deterministic strategies).

The context follows the tokens (:meth:`Context.take_tokens <tokencomp.Context.take_tokens>`): the
per-token fields (their ``N`` axis, as :meth:`Context.layout <tokencomp.Context.layout>` declares it)
are gathered at the valid positions, the other tensor fields are sliced to the group's rows, and
``grid`` is dropped (the valid tokens of a padded row do not form the grid).

This module knows nothing of :class:`~tokencomp.Compressor`: the base class hands
:func:`compress_padded` the strategy's checked compress call, its padding mode and its info layout.

Entries of :attr:`~tokencomp.CompressionResult.info` are mapped back by the kind the strategy declares
in :attr:`~tokencomp.Compressor.info_layout`: ``"position"`` (values are token positions, ``-1`` for
none), ``"token"`` (one value per input token along dimension 1; padding gets NaN, ``-1`` or
``False``) or ``"row"`` (per row or per output slot, unchanged). Undeclared entries are left out of
a padded batch's result, as their meaning is unknown.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, get_args

import torch

from tokencomp.errors import InputError

from .types import CompressionResult, Context

__all__ = ["INFO_KINDS", "PADDING_MODES", "PaddingMode", "check_padding", "compress_padded"]

INFO_KINDS = ("position", "token", "row")
# How a strategy takes a padded batch (Compressor.padding).
PaddingMode = Literal["rows", "native", "unsupported"]
PADDING_MODES: tuple[str, ...] = get_args(PaddingMode)

# compress(tokens [B, N, D], k, context) -> CompressionResult, checked for that N
CompressFn = Callable[[torch.Tensor, int, Context], CompressionResult]


def check_padding(owner: str, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The valid count of every row ``[B]`` (host tensor); raise if a row holds fewer than ``k`` valid tokens."""
    counts = valid.sum(dim=1).cpu()
    short = (counts < k).nonzero().flatten().tolist()
    if short:
        row = short[0]
        raise InputError(
            f"{owner}: batch row {row} has {int(counts[row])} valid tokens (context.valid) but the budget keeps "
            f"K={k}; every row must hold at least K valid tokens. Lower the budget to at most "
            f"{int(counts.min())}, or compress that row separately."
        )
    return counts


def compress_padded(
    x: torch.Tensor,
    k: int,
    context: Context,
    *,
    compress: CompressFn,
    mode: str,
    owner: str,
    info_layout: Mapping[str, str],
) -> CompressionResult:
    """Compress a padded batch ``x`` ``[B, N, D]`` (``context.valid`` not all ``True``) as ``mode`` says.

    Parameters
    ----------
    x : torch.Tensor
        Validated batched tokens ``[B, N, D]``.
    k : int
        Tokens kept per row.
    context : Context
        Batched context; ``context.valid`` is ``[B, N]`` bool with at least ``k`` valid tokens per row
        (else :func:`check_padding` raises).
    compress : callable
        ``compress(tokens, k, context)``: the strategy on an unpadded batch ``[r, n, D]``, with its budget
        and result checked for that ``n``.
    mode : {"rows", "native", "unsupported"}
        The strategy's :attr:`~tokencomp.Compressor.padding`: compress each group of rows of equal valid
        count on its valid tokens, hand the padded batch to ``compress`` as it is, or raise.
    owner : str
        The strategy's name, for messages.
    info_layout : mapping of str to {"position", "token", "row"}
        The strategy's :attr:`~tokencomp.Compressor.info_layout`, how each ``info`` entry is mapped back.
    """
    if mode == "unsupported":
        raise InputError(
            f"{owner}: padded batches (context.valid with False entries) are not supported, as "
            f"{owner} needs every row's tokens to form the token grid; compress rows of different "
            "lengths in separate calls, or pass context.valid=None when there is no padding."
        )
    valid = context.valid
    assert valid is not None  # the caller hands over padded batches only (context.valid not all True)
    counts = check_padding(owner, valid, k)
    if mode == "native":
        return compress(x, k, context)
    # the valid positions of every row first, in position order (a stable sort of the padding flags)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    parts: list[tuple[torch.Tensor, torch.Tensor, CompressionResult]] = []
    for count in sorted(set(counts.tolist())):
        rows = (counts == count).nonzero().flatten().to(x.device)
        positions = order.index_select(0, rows)[:, :count]  # [r, count] original positions, ascending
        sub_x = torch.gather(x.index_select(0, rows), 1, positions.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        # the valid tokens of a padded row do not form the grid
        sub_context = context.take_tokens(positions, rows).replace(valid=None, grid=None)
        parts.append((rows, positions, compress(sub_x, k, sub_context)))
    return _assemble(owner, info_layout, parts, x, k)


def _assemble(owner: str, layout: Mapping[str, str], parts: list, x: torch.Tensor, k: int) -> CompressionResult:
    """The padded batch's result from each group's ``(rows, positions, result)``."""
    b, n, d = x.shape
    first = parts[0][2]
    tokens = torch.empty(b, k, d, dtype=first.tokens.dtype, device=x.device)
    indices = torch.empty(b, k, dtype=torch.int64, device=x.device)
    assignment = torch.full((b, n), -1, dtype=torch.int64, device=x.device)
    info: dict[str, torch.Tensor] = {}
    for rows, positions, result in parts:
        tokens[rows] = result.tokens.to(tokens.dtype)
        indices[rows] = torch.gather(positions, 1, result.indices)
        assignment[rows] = assignment[rows].scatter(1, positions, result.assignment)
        for key, value in result.info.items():
            kind = layout.get(key)
            if kind is None or not isinstance(value, torch.Tensor):
                continue
            mapped = _map_info(kind, value, positions, n)
            if key not in info:
                fill = _fill(mapped.dtype)
                info[key] = torch.full((b, *mapped.shape[1:]), fill, dtype=mapped.dtype, device=mapped.device)
            elif info[key].shape[1:] != mapped.shape[1:]:
                raise RuntimeError(
                    f"{owner}: info[{key!r}] has shape {tuple(mapped.shape[1:])} per row in one "
                    f"group of the padded batch and {tuple(info[key].shape[1:])} in another."
                )
            info[key][rows] = mapped
    return CompressionResult(tokens=tokens, indices=indices, assignment=assignment, info=info)


def _map_info(kind: str, value: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """One info entry of a group ``[r, ...]`` in the padded batch's coordinates."""
    if kind == "row":
        return value
    if kind == "position":
        flat = value.reshape(value.shape[0], -1)
        mapped = torch.gather(positions, 1, flat.clamp_min(0))  # -1 (none) is restored just below
        return torch.where(flat < 0, flat, mapped).view(value.shape)
    # "token": scatter along dimension 1 to the valid positions, padding filled
    out = torch.full((value.shape[0], n, *value.shape[2:]), _fill(value.dtype), dtype=value.dtype, device=value.device)
    index = positions.view(*positions.shape, *([1] * (value.dim() - 2))).expand_as(value)
    return out.scatter(1, index, value)


def _fill(dtype: torch.dtype) -> Any:
    if dtype == torch.bool:
        return False
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    return -1
