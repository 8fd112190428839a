"""Padded batches: compress each row on its valid tokens only.

A padded batch marks its padding with ``Context.valid`` ``[B, N]`` (``False`` at padding). A strategy
whose :attr:`~tokencomp.Compressor.padding` is ``"rows"`` (the default) never sees the padding: the
rows are grouped by their number of valid tokens ``n_b``, each group's valid tokens (in position order)
are compressed as an ordinary ``[rows, n_b, D]`` batch, and the results are mapped back to the padded
positions. So padding is never kept, never merged into and never influences the other tokens, and
each row's result equals compressing its valid tokens alone (for deterministic strategies).

The context follows the tokens: per-token fields (``[B, N]`` and the ``N`` axis of
``cross_attention`` ``[B, T, N]`` and ``image_embeddings`` ``[B, N, E]``) are gathered at the valid
positions, the other batched fields are sliced to the group's rows, and ``grid`` is dropped (the
valid tokens of a padded row do not form the grid).

Entries of :attr:`~tokencomp.CompressionResult.info` are mapped back by the kind the strategy declares
in :attr:`~tokencomp.Compressor.info_layout`: ``"position"`` (values are token positions, ``-1`` for
none), ``"token"`` (one value per input token along dimension 1; padding gets NaN, ``-1`` or
``False``) or ``"row"`` (per row or per output slot, unchanged). Undeclared entries are left out of
a padded batch's result, as their meaning is unknown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tokencomp.errors import InputError

from .types import CompressionResult, Context

if TYPE_CHECKING:  # pragma: no cover
    from .base import Compressor

__all__ = ["INFO_KINDS", "compress_padded"]

INFO_KINDS = ("position", "token", "row")

# Context fields with a token axis, and which dimension it is.
_TOKEN_AXIS = {"cls_attention": 1, "text_attention": 1, "visual_positions": 1, "cross_attention": 2, "image_embeddings": 1}


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


def compress_padded(compressor: "Compressor", x: torch.Tensor, k: int, context: Context) -> CompressionResult:
    """Compress a padded batch ``x`` ``[B, N, D]`` group by group of equal valid counts.

    ``context.valid`` must be batched ``[B, N]`` bool with at least ``k`` valid tokens per row (see
    :func:`check_padding`).
    """
    owner = compressor.display_name()
    b, n, d = x.shape
    valid = context.valid
    counts = check_padding(owner, valid, k)
    # the valid positions of every row first, in position order (a stable sort of the padding flags)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    parts: list[tuple[torch.Tensor, torch.Tensor, CompressionResult]] = []
    for count in sorted(set(counts.tolist())):
        rows = (counts == count).nonzero().flatten().to(x.device)
        positions = order.index_select(0, rows)[:, :count]  # [r, count] original positions, ascending
        sub_x = _take(x, rows, positions, 1)
        sub_context = _sub_context(context, rows, positions)
        compressor._check_budget(k, count, sub_context)
        result = compressor._compress(sub_x, k, sub_context)
        compressor._check_result(result, rows.numel(), count, k, d)
        parts.append((rows, positions, result))
    return _assemble(compressor, parts, b, n, k, d, x)


def _take(value: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, axis: int) -> torch.Tensor:
    """``value`` at ``rows`` with its token ``axis`` gathered at ``positions`` ``[r, count]``."""
    value = value.index_select(0, rows)
    shape = [positions.shape[0]] + [1] * (value.dim() - 1)
    shape[axis] = positions.shape[1]
    index = positions.view(shape).expand(*[s if i == axis else value.shape[i] for i, s in enumerate(shape)])
    return torch.gather(value, axis, index)


def _sub_context(context: Context, rows: torch.Tensor, positions: torch.Tensor) -> Context:
    fields: dict[str, Any] = {}
    for name in Context.field_names():
        value = getattr(context, name)
        if name in ("valid", "grid"):
            value = None
        elif isinstance(value, torch.Tensor) and name in _TOKEN_AXIS:
            value = _take(value, rows.to(value.device), positions.to(value.device), _TOKEN_AXIS[name])
        elif isinstance(value, torch.Tensor) and value.dim() >= 1:
            value = value.index_select(0, rows.to(value.device))
        fields[name] = value
    return Context(**fields)


def _assemble(
    compressor: "Compressor", parts: list, b: int, n: int, k: int, d: int, x: torch.Tensor
) -> CompressionResult:
    first = parts[0][2]
    tokens = torch.empty(b, k, d, dtype=first.tokens.dtype, device=x.device)
    indices = torch.empty(b, k, dtype=torch.int64, device=x.device)
    assignment = torch.full((b, n), -1, dtype=torch.int64, device=x.device)
    layout = compressor.info_layout
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
                info[key] = torch.full((b, *mapped.shape[1:]), _fill(mapped.dtype), dtype=mapped.dtype, device=mapped.device)
            elif info[key].shape[1:] != mapped.shape[1:]:
                raise RuntimeError(
                    f"{compressor.display_name()}: info[{key!r}] has shape {tuple(mapped.shape[1:])} per row in one "
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
