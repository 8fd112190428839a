"""Result and context types shared by every strategy."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple, Optional

import torch

__all__ = ["CompressionResult", "Context", "FieldLayout"]


@dataclass
class CompressionResult:
    """What a compressor returns.

    Attributes
    ----------
    tokens : torch.Tensor
        ``[B, K, D]`` (or ``[K, D]`` for unbatched input) compressed tokens, in the input's dtype and
        device, in the order the language model receives them.
    indices : torch.Tensor
        ``[B, K]`` int64, the original position each output token sits at, in the order of ``tokens``:
        unique in each row, and strictly ascending unless the strategy's ``output_order`` is
        ``"strategy"`` (its authors feed another order, e.g. VisionZip's contextual tokens after its
        dominant ones).
    assignment : torch.Tensor
        ``[B, N]`` int64, the output slot that represents each input token: its own slot when it is
        kept, its merge target when it was merged, ``-1`` when it was dropped without merging. For every
        output slot ``k``, ``assignment[b, indices[b, k]] == k``.
    info : dict
        Method-specific tensors (for ApET ``basis_indices`` ``[B, M]`` and ``errors`` ``[B, N]``).
    """

    tokens: torch.Tensor
    indices: torch.Tensor
    assignment: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        """Number of output tokens ``K``."""
        return self.indices.shape[-1]


class FieldLayout(NamedTuple):
    """How a tensor field of :class:`Context` is laid out.

    Attributes
    ----------
    shape : str
        Its shape in symbols, batch first, e.g. ``"[B, T, N]"``; ``N`` is the visual tokens' axis.
    rank : int
        Its number of dimensions, batch included.
    token_dim : int or None
        The dimension of its token axis ``N`` (the field holds one entry per visual token), else ``None``.
    dtype : str
        What its values must be: ``"float"`` (any floating-point dtype), ``"bool"`` or ``"int64"``.
    """

    shape: str
    rank: int
    token_dim: Optional[int]
    dtype: str = "float"

    def accepts(self, dtype: torch.dtype) -> bool:
        """Whether a tensor of ``dtype`` may hold this field."""
        if self.dtype == "float":
            return dtype.is_floating_point
        return dtype == {"bool": torch.bool, "int64": torch.int64}[self.dtype]

    def expected(self, b: int, n: int) -> str:
        """The shape with the batch size ``b`` and the token count ``n`` filled in, e.g. ``"[2, T, 16]"``."""
        dims = self.shape.strip("[]").split(", ")
        return "[" + ", ".join(str(b) if s == "B" else str(n) if s == "N" else s for s in dims) + "]"


def _tensor(shape: str, dtype: str = "float") -> Any:
    """An optional tensor field of :class:`Context` of the given ``shape`` (batch first, e.g. ``"[B, N]"``)
    and ``dtype`` (:attr:`FieldLayout.dtype`)."""
    dims = shape.strip("[]").split(", ")
    token_dim = dims.index("N") if "N" in dims else None
    return field(default=None, metadata={"layout": FieldLayout(shape, len(dims), token_dim, dtype)})


@dataclass
class Context:
    """Optional side information for :meth:`Compressor.compress`.

    Every field is optional. A strategy that needs a field that is missing raises a ``ValueError``
    naming the field. Tensor fields are batched like the tokens (a leading ``B`` dimension) or, for
    unbatched tokens, may omit it. Each tensor field's shape is declared once, with the field
    (:meth:`layout`); validation, padded batches and the conformance kit read it from there.

    Attributes
    ----------
    grid : tuple of int, optional
        Token layout, ``(h, w)`` for an image or ``(t, h, w)`` for a video, with ``prod(grid) == N``.
    cls_attention : torch.Tensor, optional
        ``[B, N]`` attention of the vision tower's [CLS] token to the visual tokens.
    text_embeddings : torch.Tensor, optional
        ``[B, T, D]`` embeddings of the instruction's tokens.
    text_attention : torch.Tensor, optional
        ``[B, N]`` attention of the text (or last) token to the visual tokens.
    hidden_states : torch.Tensor, optional
        ``[B, L, H]`` hidden states of the language model, for strategies that run inside it.
    layer : int, optional
        Index of the decoder layer the strategy runs after.
    valid : torch.Tensor, optional
        ``[B, N]`` bool, ``False`` at padding positions of a padded batch.
    generator : torch.Generator, optional
        Source of randomness; overrides the strategy's ``seed``.
    cross_attention : torch.Tensor, optional
        ``[B, T, N]`` attention of each of ``T`` text tokens to the visual tokens at ``layer``,
        averaged over heads (SparseVLM's text raters).
    query : torch.Tensor, optional
        ``[B, H, Dh]`` query of the rater token (the last instruction token) at ``layer``, with its
        rotary embedding applied, for strategies that compute one attention row themselves.
    keys : torch.Tensor, optional
        ``[B, H, L, Dh]`` keys of the ``L`` tokens the rater attends to at ``layer`` (rotary applied,
        key/value heads repeated to ``H``).
    visual_positions : torch.Tensor, optional
        ``[B, N]`` int64 positions of the visual tokens among the ``L`` keys.
    key_mask : torch.Tensor, optional
        ``[B, L]`` bool, ``False`` for keys the rater must not attend to (padding).
    image_embeddings : torch.Tensor, optional
        ``[B, N, E]`` the visual tokens in the joint image-text space of ``text_embeddings`` (for CLIP:
        the vision tower's post-layernorm and visual projection), for strategies that score the tokens'
        relevance to the instruction. When absent, such strategies use the tokens themselves.
    raters : torch.Tensor, optional
        ``[B, T]`` bool, the text tokens (rows of ``cross_attention``) that rate the visual tokens, as an
        earlier stage of the same multi-stage strategy chose them (SparseVLM chooses its raters once and
        reuses them at every later layer). The in-LLM integration hands each stage what the previous
        stage of the same compressor returned in ``info`` under the names in its
        :attr:`~tokencomp.Compressor.carries`; absent at the first stage and in a direct call.
    schedule_n : int, optional
        For a strategy that sets its own per-layer budgets
        (:meth:`~tokencomp.Compressor.stage_budgets`): the number of visual tokens that entered its
        first stage, the ``n`` its schedule was computed from (the in-LLM integration sets it at every
        stage).
    """

    grid: Optional[tuple[int, ...]] = None
    cls_attention: Optional[torch.Tensor] = _tensor("[B, N]")
    text_embeddings: Optional[torch.Tensor] = _tensor("[B, T, D]")
    text_attention: Optional[torch.Tensor] = _tensor("[B, N]")
    hidden_states: Optional[torch.Tensor] = _tensor("[B, L, H]")
    layer: Optional[int] = None
    valid: Optional[torch.Tensor] = _tensor("[B, N]", "bool")
    generator: Optional[torch.Generator] = None
    cross_attention: Optional[torch.Tensor] = _tensor("[B, T, N]")
    query: Optional[torch.Tensor] = _tensor("[B, H, Dh]")
    keys: Optional[torch.Tensor] = _tensor("[B, H, L, Dh]")
    visual_positions: Optional[torch.Tensor] = _tensor("[B, N]", "int64")
    key_mask: Optional[torch.Tensor] = _tensor("[B, L]", "bool")
    image_embeddings: Optional[torch.Tensor] = _tensor("[B, N, E]")
    raters: Optional[torch.Tensor] = _tensor("[B, T]", "bool")
    schedule_n: Optional[int] = None

    # ------------------------------------------------------------------ the fields' layout
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all context fields."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def layout(cls) -> dict[str, FieldLayout]:
        """The tensor fields, each batched along dimension 0, and their :class:`FieldLayout`."""
        return {f.name: f.metadata["layout"] for f in fields(cls) if "layout" in f.metadata}

    @classmethod
    def batched_fields(cls) -> dict[str, int]:
        """Every tensor field (batched along dimension 0) and its number of dimensions, batch included."""
        return {name: layout.rank for name, layout in cls.layout().items()}

    @classmethod
    def per_token_fields(cls) -> dict[str, int]:
        """The fields with one entry per visual token, and the dimension of their token axis ``N``."""
        return {name: layout.token_dim for name, layout in cls.layout().items() if layout.token_dim is not None}

    # ------------------------------------------------------------------ derived contexts
    def replace(self, **changes: Any) -> "Context":
        """A copy with the fields ``changes`` set."""
        return replace(self, **changes)

    def select_rows(self, rows: torch.Tensor) -> "Context":
        """The context of the batch rows ``rows`` (int64 ``[r]``): every tensor field indexed along dimension 0.

        The context must be batched (as :meth:`~tokencomp.Compressor.compress` hands it to ``_compress``).
        """
        return self.replace(
            **{name: value.index_select(0, rows.to(value.device)) for name, value in self._tensors().items()}
        )

    def row(self, i: int) -> "Context":
        """The context of batch row ``i`` alone (every tensor field sliced to ``[i : i + 1]``)."""
        return self.replace(**{name: value[i : i + 1] for name, value in self._tensors().items()})

    def take_tokens(self, positions: torch.Tensor, rows: Optional[torch.Tensor] = None) -> "Context":
        """The context of the tokens at ``positions`` ``[r, M]`` (int64) of the batch rows ``rows`` ``[r]``.

        Per-token fields are gathered at ``positions`` along their token axis; the other tensor fields are
        indexed at ``rows``. ``rows`` defaults to every row (then ``r = B``). ``grid`` is kept as it is:
        a caller that takes a subset of the tokens drops it.
        """
        out = self if rows is None else self.select_rows(rows)
        token_dims = self.per_token_fields()
        return out.replace(
            **{
                name: _gather_axis(value, positions.to(value.device), token_dims[name])
                for name, value in out._tensors().items()
                if name in token_dims
            }
        )

    def to(self, device: torch.device | str) -> "Context":
        """A copy with every tensor field on ``device``."""
        return self.replace(**{name: value.to(device) for name, value in self._tensors().items()})

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set."""
        return {name: getattr(self, name) for name in self.layout() if isinstance(getattr(self, name), torch.Tensor)}


def _gather_axis(value: torch.Tensor, positions: torch.Tensor, axis: int) -> torch.Tensor:
    """``value`` ``[r, ...]`` with its dimension ``axis`` gathered at ``positions`` ``[r, M]``."""
    shape = [positions.shape[0]] + [1] * (value.dim() - 1)
    shape[axis] = positions.shape[1]
    index = positions.view(shape).expand(*[s if i == axis else value.shape[i] for i, s in enumerate(shape)])
    return torch.gather(value, axis, index)
