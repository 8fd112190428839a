"""The abstract base class every compression strategy subclasses."""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from contextvars import ContextVar
from typing import Any, ClassVar, Literal, Optional

import torch

from tokencomp.errors import InputError

from .constraints import ParameterConstraints, validate
from .padding import PaddingMode, check_padding, compress_padded
from .types import CompressionResult, Context, FieldLayout
from .validation import all_finite, check_finite, check_tokens, resolve_budget

# The values of the string capabilities. tc.register checks every class against these and against
# bool for the flags (tokencomp.registry.CAPABILITY_VALUES reads them from the annotations below);
# PaddingMode is tokencomp.padding's.
Stage = Literal["pre_llm", "in_llm"]
InLLMPositions = Literal["keep", "renumber"]
OutputOrder = Literal["position", "strategy"]

__all__ = ["Compressor"]

# (tokens, what Compressor._inspect computed from them) during a compress() call
_INSPECTED: ContextVar[Optional[tuple[torch.Tensor, Any]]] = ContextVar("tokencomp_inspected", default=None)


class Compressor(ABC):
    """Base class of visual-token compression strategies.

    A strategy subclasses this class, declares its capabilities as class attributes, takes its
    parameters as keyword-only ``__init__`` arguments, declares what each allows in
    ``parameter_constraints`` (checked before ``__init__`` runs) and implements only
    :meth:`_compress`. :meth:`compress` does everything shared: input and budget checks, adding and
    removing the batch dimension, restoring the dtype, and checking the result's shapes.

    Attributes
    ----------
    name : str
        Registry name, set by :func:`tokencomp.register` (the class name when unregistered).
    stage : {"pre_llm", "in_llm"}
        Where the strategy runs: on vision features before the language model, or on hidden states
        inside it.
    needs_attention : bool
        It reads attention weights, so it cannot run under FlashAttention / SDPA kernels.
    text_conditioned : bool
        Its selection depends on the instruction.
    deterministic : bool
        Its output is a function of its input alone (no random numbers, seeded or not).
    requires : tuple of str
        :class:`Context` fields that must be given to :meth:`compress`.
    carries : tuple of str
        For a multi-stage in-LLM strategy: :attr:`CompressionResult.info` entries that the next stage of
        the same compressor receives as the :class:`Context` field of the same name (each a per-row
        field, without the token axis ``N``, since the tokens change between stages). SparseVLM carries
        its ``raters``. Empty by default; a direct :meth:`compress` call receives only what it is given.
    summary : str
        One line shown by ``tokencomp ls``.
    paper : str
        Citation of the method (empty for the simple references).
    in_llm_positions : {"keep", "renumber"}
        For in-LLM strategies: whether the kept tokens keep their original position ids in later layers
        and decoding (FastV, DART) or the shorter sequence is renumbered (ApET's stage 2, SparseVLM,
        PyramidDrop). A strategy whose value depends on a parameter makes it a property (PyramidDrop's
        ``positions``); ``tc.register`` then leaves it to be read per instance.
    output_order : {"position", "strategy"}
        The order of :attr:`CompressionResult.tokens`, which is the order the language model receives
        them in. ``"position"`` (default): ascending original position, so ``indices`` is strictly
        ascending. ``"strategy"``: the strategy's own sequence (VisionZip's and PruMerge's authors feed
        their dominant tokens or centres first); ``indices`` is then unique but in that order. A
        strategy whose order depends on a parameter makes it a property, as ``in_llm_positions``.
        In-LLM stages must keep position order (the hidden states stay in sequence order).
    parameter_constraints : dict of str to tuple of Constraint
        What each ``__init__`` parameter allows (:mod:`tokencomp.constraints`), e.g.
        ``{"num_basis": (Interval(int, 1),), "seed": (IsNone(), Interval(int, 0))}``. The declared
        parameters are validated, with one message format, and converted before ``__init__`` runs;
        ``tc.register`` refuses a name that is no parameter, and the conformance suite passes every
        parameter the values its constraints refuse. Rules between parameters stay in ``__init__``.
    budget_param : str
        For strategies that set their own per-layer budgets (``stage_budgets``): the parameter that
        sets the overall number of visual tokens kept (SparseVLM's ``retained``), so a comparison at a
        budget can set it; empty when there is none (PyramidDrop's schedule is a ratio).
    complexity : str
        Time of one call as ``O(...)`` in the symbols ``N`` (tokens), ``K`` (kept), ``L`` (sequence
        length), ``D`` (width) and the method's own constants (``M``, ``T``, ``H``, ...), e.g.
        ``"O(M N D + N K D)"``. ``tokencomp bench`` checks its scaling curve against it; empty when
        undeclared.
    cost_regimes : dict of str to dict
        For a strategy that switches between algorithms at a memory bound (VisPruner caches its cosines
        while they fit): a name per algorithm and the constructor parameters that force it.
        ``tokencomp bench`` times each as its own scaling curve, ``name[regime]``, checked against
        ``complexity`` like the default one (whose curve crosses from one to the other). Empty by
        default.
    padding : {"rows", "native", "unsupported"}
        How a padded batch (``Context.valid`` with ``False`` entries) is compressed. ``"rows"``
        (default): the base class compresses each row's valid tokens only, grouping rows of equal valid
        counts (:mod:`tokencomp.padding`), so ``_compress`` never sees padding. ``"native"``:
        ``_compress`` reads ``context.valid`` itself and must never keep or merge into padding.
        ``"unsupported"``: a padded batch raises ``ValueError`` (for a strategy that needs the token
        grid, which padding breaks).
    info_layout : dict of str to {"position", "token", "row"}
        The kind of each :attr:`CompressionResult.info` entry, so that a padded batch's entries are
        mapped back to the padded positions: token positions, one value per input token (dimension
        1), or per row / per output slot. Undeclared entries are left out of a padded batch's result.
    scale_invariant : bool
        Multiplying every token by ``s > 0`` keeps the same positions and multiplies the output tokens
        by ``s`` (the selection reads only directions and ratios). A strategy with an absolute constant
        in its algorithm (ApET's ridge, SparseVLM's density ``exp(-d^2)``) is not; the conformance
        check :func:`~tokencomp.testing.check_extreme_magnitudes` holds a strategy to its claim.
    convex_outputs : bool
        Every output token is a weighted average of input tokens (a kept token, a mean, a weighted
        mean). False for strategies that add tokens up (PruMerge's ``x_i + sum_j a_j x_j``); their
        outputs must still lie in the inputs' span.

    Examples
    --------
    >>> import torch, tokencomp as tc
    >>> class TopNorm(tc.Compressor):
    ...     deterministic = True
    ...     def _compress(self, tokens, k, context):
    ...         idx = tokens.norm(dim=-1).topk(k, dim=-1).indices.sort(dim=-1).values
    ...         return tc.selection_result(tokens, idx)
    >>> TopNorm().compress(torch.randn(2, 16, 8), 4).tokens.shape
    torch.Size([2, 4, 8])
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = "pre_llm"
    needs_attention: ClassVar[bool] = False
    text_conditioned: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    carries: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    in_llm_positions: ClassVar[InLLMPositions] = "keep"
    output_order: ClassVar[OutputOrder] = "position"
    budget_param: ClassVar[str] = ""
    complexity: ClassVar[str] = ""
    cost_regimes: ClassVar[dict[str, dict[str, Any]]] = {}
    padding: ClassVar[PaddingMode] = "rows"
    parameter_constraints: ClassVar[ParameterConstraints] = {}
    info_layout: ClassVar[dict[str, str]] = {}
    scale_invariant: ClassVar[bool] = False
    convex_outputs: ClassVar[bool] = True

    # ------------------------------------------------------------------ parameters
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _validating(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @classmethod
    def _param_names(cls) -> list[str]:
        init = cls.__init__
        if init is object.__init__:
            return []
        sig = inspect.signature(init)
        return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def get_params(self) -> dict[str, Any]:
        """Return the constructor parameters, so that ``type(self)(**self.get_params())`` rebuilds it."""
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    @classmethod
    def flash_attention(cls) -> str:
        """Whether the strategy runs beside FlashAttention / SDPA kernels, derived from its capabilities.

        ``"yes"`` when it reads no attention weights; for ``needs_attention`` strategies, which
        attention it reads: the vision tower's [CLS] row (only the vision-tower layer it is read from must
        run eagerly; the language model keeps its fast kernel) or the language model's attention (eager
        attention in that decoder layer).
        """
        if not cls.needs_attention:
            return "yes"
        if "cls_attention" in cls.requires:
            return "LLM yes; [CLS] row needs one eager ViT layer"
        return "no: reads LLM attention weights"

    # ------------------------------------------------------------------ placement inside the LLM
    def llm_layers(self) -> tuple[int, ...]:
        """The decoder layers an in-LLM strategy acts at, in order: one per stage.

        Every ``stage = "in_llm"`` strategy declares them (``tc.register`` refuses one that does not):
        FastV, DART and ApET's stage 2 at their ``layer``, PyramidDrop and SparseVLM at each of their
        ``layers``. A pre-LLM strategy has none.
        """
        return ()

    def stage_budgets(self, n: int) -> Optional[list[int]]:
        """Visual tokens kept at each of :meth:`llm_layers` from ``n`` entering the first, for a
        strategy that sets its own per-layer schedule (PyramidDrop, SparseVLM); ``None`` (the default)
        when the caller's budget applies."""
        return None

    def sets_own_budgets(self) -> bool:
        """Whether the strategy sets its own per-layer budgets: by default, whether its class overrides
        :meth:`stage_budgets` (a wrapper around another strategy delegates all three hooks)."""
        return type(self).stage_budgets is not Compressor.stage_budgets

    @classmethod
    def display_name(cls) -> str:
        """Registry name, or the class name for an unregistered subclass."""
        return cls.name or cls.__name__

    # ------------------------------------------------------------------ the public call
    def compress(
        self, tokens: torch.Tensor, budget: int | float, context: Optional[Context] = None
    ) -> CompressionResult:
        """Compress ``tokens`` down to ``budget`` tokens.

        Parameters
        ----------
        tokens : torch.Tensor
            ``[B, N, D]`` or ``[N, D]`` floating-point visual tokens (any float dtype and device).
        budget : int or float
            ``int >= 1``: tokens kept; ``float`` in ``(0, 1]``: fraction of ``N`` kept
            (``K = max(1, round(budget * N))``).
        context : Context, optional
            Side information; strategies list what they need in :attr:`requires`.

        Returns
        -------
        CompressionResult
            Without the batch dimension when ``tokens`` was ``[N, D]``.

        Raises
        ------
        ValueError
            Bad tokens, a budget outside the valid range, or a missing or malformed context field.
        """
        owner = self.display_name()
        x, unbatched = check_tokens(owner, tokens, finite=False)
        # the one pass over the values (and host sync) that tells they are finite: the strategy's own
        # (_inspect), whose results _compress may read back (_inspected); the exact check where it
        # cannot vouch for them
        finite, inspected = self._inspect(x)
        if not bool(finite.all()):
            check_finite(owner, x)
            inspected = None
        b, n, d = x.shape
        context = self._batched_context(context, x, unbatched)
        k = resolve_budget(owner, budget, n)
        self._check_budget(k, n, context)
        padded = context.valid is not None and not bool(context.valid.all())
        if padded and self.padding != "native":
            result = compress_padded(
                x,
                k,
                context,
                compress=self._compress_checked,
                mode=self.padding,
                owner=owner,
                info_layout=self.info_layout,
            )
        else:
            if padded:  # a native strategy reads context.valid itself, checked once here
                assert context.valid is not None
                check_padding(owner, context.valid, k)
            handle = _INSPECTED.set((x, inspected))
            try:
                result = self._compress(x, k, context)
            finally:
                _INSPECTED.reset(handle)
        self._check_result(result, b, n, k, d)
        out_tokens = result.tokens.to(dtype=tokens.dtype, device=tokens.device)
        if unbatched:
            return CompressionResult(
                tokens=out_tokens[0],
                indices=result.indices[0],
                assignment=result.assignment[0],
                info={key: _unbatch(v) for key, v in result.info.items()},
            )
        result.tokens = out_tokens
        return result

    def _compress_checked(self, x: torch.Tensor, k: int, context: Context) -> CompressionResult:
        """:meth:`_compress` on ``x`` ``[B, N, D]`` with the budget checked for this ``N`` and the result's
        shapes checked (how :func:`~tokencomp.padding.compress_padded` runs the strategy on a sub-batch)."""
        b, n, d = x.shape
        self._check_budget(k, n, context)
        result = self._compress(x, k, context)
        self._check_result(result, b, n, k, d)
        return result

    def _inspect(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One pass over the validated tokens ``[B, N, D]`` that tells whether they are finite, before
        :meth:`_compress`.

        Returns a bool tensor (all ``True``: every value is finite; else :meth:`compress` runs the exact
        check, which raises for a NaN or an infinity) and whatever else the pass computed, which
        :meth:`_compress` reads back with :meth:`_inspected` (``None`` when the exact check ran). The
        default sums the tokens. A strategy that needs a pass over the tokens anyway (their norms, say)
        makes it its check, sparing one pass; it must not synchronise with the host itself.
        """
        return torch.isfinite(tokens.sum()), None

    def _inspected(self, tokens: torch.Tensor) -> Any:
        """What :meth:`_inspect` returned besides the check for these very ``tokens`` during this
        :meth:`compress` call, else ``None`` (another tensor, a padded sub-batch, a direct call)."""
        seen = _INSPECTED.get()
        return seen[1] if seen is not None and seen[0] is tokens else None

    @abstractmethod
    def _compress(self, tokens: torch.Tensor, k: int, context: Context) -> CompressionResult:
        """Compress validated batched tokens ``[B, N, D]`` to exactly ``k`` tokens each."""

    def _check_budget(self, k: int, n: int, context: Context) -> None:  # noqa: B027 - a hook; default: any k
        """Raise ``ValueError`` if this strategy, as configured, cannot keep ``k`` of ``n`` tokens."""

    # ------------------------------------------------------------------ helpers for subclasses
    def _generator(self, context: Context, device: torch.device) -> Optional[torch.Generator]:
        """The random generator for one call: ``context.generator``, else one seeded with ``seed``."""
        if context.generator is not None:
            return context.generator
        seed = getattr(self, "seed", None)
        if seed is None:
            return None
        return torch.Generator(device=device).manual_seed(seed)

    def _batched_context(self, context: Optional[Context], x: torch.Tensor, unbatched: bool) -> Context:
        """``context`` checked against the tokens ``x`` ``[B, N, D]``, its tensor fields batched.

        Every tensor field must have the shape its :class:`~tokencomp.types.FieldLayout` declares (for
        ``unbatched`` tokens it may omit the batch dimension, which is added).
        """
        owner = self.display_name()
        if context is None:
            context = Context()
        elif not isinstance(context, Context):
            raise InputError(f"{owner}: context must be a tokencomp.Context or None; got {type(context).__name__}.")
        for name in self.requires:
            if getattr(context, name) is None:
                raise InputError(
                    f"{owner}: needs context.{name}, which is missing. "
                    f"Pass tokencomp.Context({name}=...) to compress()."
                )
        b, n, _ = x.shape
        updates: dict[str, Any] = {
            name: _batched_field(owner, name, layout, getattr(context, name), b, n, unbatched)
            for name, layout in Context.layout().items()
            if getattr(context, name) is not None
        }
        for name, least in (("layer", 0), ("schedule_n", 1)):
            value = getattr(context, name)
            if value is not None and (type(value) is not int or value < least):
                raise InputError(f"{owner}: context.{name} must be an int >= {least} or None; got {value!r}.")
        if context.generator is not None and not isinstance(context.generator, torch.Generator):
            raise InputError(
                f"{owner}: context.generator must be a torch.Generator or None; got {type(context.generator).__name__}."
            )
        if context.grid is not None:
            updates["grid"] = _checked_grid(owner, context.grid, n)
        self._check_attention_inputs(updates, context, b, n)
        self._check_finite_requirements(updates, context)
        if not updates:
            return context
        return context.replace(**updates)

    def _check_finite_requirements(self, updates: dict, context: Context) -> None:
        """Raise if a required floating-point context field holds NaN or infinite values.

        Checked here, once, so that no strategy's ``_compress`` needs a host synchronisation to
        validate its inputs (the kernels then run the same on GPU).
        """
        for name in self.requires:
            value = updates.get(name, getattr(context, name))
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not all_finite(value):
                raise InputError(
                    f"{self.display_name()}: context.{name} contains NaN or infinite values; pass finite values."
                )

    def _check_attention_inputs(self, updates: dict, context: Context, b: int, n: int) -> None:
        owner = self.display_name()
        get = lambda name: updates.get(name, getattr(context, name))  # noqa: E731
        image = get("image_embeddings")
        text, joint_dim = get("text_embeddings"), (image.shape[2] if image is not None else None)
        if text is not None and joint_dim is not None and text.shape[2] != joint_dim:
            raise InputError(
                f"{owner}: context.text_embeddings [B, T, E] and context.image_embeddings [B, N, E] must share "
                f"E; got {tuple(text.shape)} and {tuple(image.shape)}."
            )
        query, keys, pos, mask = get("query"), get("keys"), get("visual_positions"), get("key_mask")
        if query is not None and keys is not None:
            if keys.shape[1] != query.shape[1] or keys.shape[3] != query.shape[2]:
                raise InputError(
                    f"{owner}: context.keys [B, H, L, Dh] = {tuple(keys.shape)} does not match "
                    f"context.query [B, H, Dh] = {tuple(query.shape)}."
                )
        if pos is not None:  # int64: checked with its layout
            if keys is not None and bool(((pos < 0) | (pos >= keys.shape[2])).any()):
                raise InputError(f"{owner}: context.visual_positions must index the L={keys.shape[2]} keys.")
        if (
            mask is not None
            and keys is not None
            and (mask.dtype != torch.bool or tuple(mask.shape) != (b, keys.shape[2]))
        ):
            raise InputError(
                f"{owner}: context.key_mask must be bool of shape [B, L] = [{b}, {keys.shape[2]}]; "
                f"got {mask.dtype} {tuple(mask.shape)}."
            )

    def _check_result(self, result: CompressionResult, b: int, n: int, k: int, d: int) -> None:
        owner = self.display_name()
        problems = []
        if not isinstance(result, CompressionResult):
            raise TypeError(f"{owner}._compress must return a CompressionResult; got {type(result).__name__}.")
        if tuple(result.tokens.shape) != (b, k, d):
            problems.append(f"tokens {tuple(result.tokens.shape)} != {(b, k, d)}")
        if tuple(result.indices.shape) != (b, k) or result.indices.dtype != torch.int64:
            problems.append(f"indices {tuple(result.indices.shape)} {result.indices.dtype} != {(b, k)} int64")
        if tuple(result.assignment.shape) != (b, n) or result.assignment.dtype != torch.int64:
            problems.append(f"assignment {tuple(result.assignment.shape)} {result.assignment.dtype} != {(b, n)} int64")
        if problems:
            raise RuntimeError(f"{owner}._compress returned a malformed result: " + "; ".join(problems))


def _validating(init: Any) -> Any:
    """``init`` with its arguments first checked against ``type(self).parameter_constraints``."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Compressor, *args: Any, **kwargs: Any) -> None:
        constraints = type(self).parameter_constraints
        if constraints:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            owner = type(self).display_name()
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    bound.arguments[name] = {
                        key: validate(owner, key, v, constraints[key]) if key in constraints else v
                        for key, v in value.items()
                    }
                elif name in constraints:
                    bound.arguments[name] = validate(owner, name, value, constraints[name])
            args, kwargs = bound.args[1:], bound.kwargs
        init(self, *args, **kwargs)

    return __init__


def _batched_field(
    owner: str, name: str, layout: FieldLayout, value: Any, b: int, n: int, unbatched: bool
) -> torch.Tensor:
    """The tensor field ``name`` checked against its ``layout`` for ``B = b``, ``N = n``, batched."""
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"{owner}: context.{name} must be a tensor of shape {layout.shape}; got {type(value).__name__}."
        )
    if unbatched and value.dim() == layout.rank - 1:
        value = value.unsqueeze(0)
    token_dim = layout.token_dim
    if value.dim() != layout.rank or value.shape[0] != b or (token_dim is not None and value.shape[token_dim] != n):
        raise InputError(
            f"{owner}: context.{name} must have shape {layout.shape} = {layout.expected(b, n)} to match the tokens; "
            f"got {tuple(value.shape)}."
        )
    if not layout.accepts(value.dtype):
        kind = "floating-point" if layout.dtype == "float" else layout.dtype
        raise InputError(f"{owner}: context.{name} must be a {kind} tensor {layout.shape}; got {value.dtype}.")
    return value


def _checked_grid(owner: str, grid: Any, n: int) -> tuple[int, ...]:
    """``grid`` as a tuple, checked to be ``(h, w)`` or ``(t, h, w)`` of positive ints holding ``n`` tokens."""
    given, grid = grid, tuple(grid)
    if len(grid) not in (2, 3) or not all(type(g) is int and g >= 1 for g in grid):  # a bool is no size
        raise InputError(f"{owner}: context.grid must be (h, w) or (t, h, w) of positive ints; got {given!r}.")
    if _prod(grid) != n:
        raise InputError(f"{owner}: context.grid={grid} holds {_prod(grid)} tokens but the tokens have N={n}.")
    return grid


def _prod(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _unbatch(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
        return value[0]
    return value
