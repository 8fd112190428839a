"""Running strategies inside Hugging Face ``transformers`` vision-language models.

``tokencomp.apply(model, strategy, budget=..., **params)`` installs hooks on the model and returns a
:class:`Handle`; ``handle.remove()`` (or leaving a ``with`` block) restores it exactly. The model's
weights are never touched. A schedule of several stages is one argument:
``tc.apply(model, [("apet", 288), ("apet-llm", 96)])``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from tokencomp.errors import InputError

from ..base import Compressor
from ..registry import create
from ..validation import check_budget
from .base import Integration
from .budget import apply_owner
from .decoder import Stage
from .handle import Handle
from .llava import LlavaIntegration
from .llava_next import LlavaNextIntegration
from .qwen2_vl import QwenVLIntegration

__all__ = ["Handle", "apply", "SUPPORTED"]

# transformers class name -> integration
SUPPORTED = {
    "LlavaForConditionalGeneration": LlavaIntegration,
    "LlavaNextForConditionalGeneration": LlavaNextIntegration,
    "LlavaOnevisionForConditionalGeneration": LlavaNextIntegration,
    "LlavaNextVideoForConditionalGeneration": LlavaNextIntegration,
    "Qwen2VLForConditionalGeneration": QwenVLIntegration,
    "Qwen2_5_VLForConditionalGeneration": QwenVLIntegration,
    "Qwen3VLForConditionalGeneration": QwenVLIntegration,
}


def _integration(model: Any) -> type[Integration]:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    raise TypeError(
        f"tokencomp.apply: {type(model).__name__} is not supported yet; supported model classes: "
        f"{', '.join(sorted(SUPPORTED))}."
    )


def _compressor(strategy: Any, params: dict) -> Compressor:
    if isinstance(strategy, Compressor):
        if params:
            raise InputError(
                f"tokencomp.apply: parameters {sorted(params)} were given with a ready {type(strategy).__name__} "
                "instance; pass the strategy's name instead, or set them on the instance."
            )
        return strategy
    if isinstance(strategy, str):
        return create(strategy, **params)
    raise TypeError(
        f"tokencomp.apply: a strategy must be a registered name or a Compressor; got {type(strategy).__name__}."
    )


def _in_llm_stages(compressor: Compressor, budget: Any) -> list[Stage]:
    """A strategy's stages, one per :meth:`~tokencomp.Compressor.llm_layers` entry: at the caller's
    budget, or at the strategy's own :meth:`~tokencomp.Compressor.stage_budgets`."""
    name = compressor.display_name()
    layers = compressor.llm_layers()
    if not layers:
        raise InputError(
            f"tokencomp.apply: in-LLM strategy {name!r} says at no decoder layer where it acts; override "
            f"{type(compressor).__name__}.llm_layers() to return its layers (one per stage)."
        )
    if not compressor.sets_own_budgets():
        check_budget(apply_owner(compressor), budget)
        return [Stage(compressor, budget, layer) for layer in layers]
    if budget is not None:
        raise InputError(
            f"tokencomp.apply: {name!r} sets its own budget at each of its layers {list(layers)} "
            "(stage_budgets); pass budget=None."
        )
    first: dict[str, int] = {}

    def budget_of(s: int) -> Callable[[int], int]:
        def resolve(n: int) -> int:
            if s == 0:
                first["n"] = n
            budgets = compressor.stage_budgets(first["n"])
            assert budgets is not None  # sets_own_budgets(): the strategy overrides stage_budgets
            return budgets[s]

        return resolve

    return [Stage(compressor, budget_of(s), layer) for s, layer in enumerate(layers)]


def apply(
    model: Any,
    strategy: Union[str, Compressor, Sequence[tuple]],
    budget: Optional[int | float] = None,
    *,
    point: Optional[str] = None,
    allow_eager_fallback: bool = False,
    video: str = "clip",
    **params: Any,
) -> Handle:
    """Compress the visual tokens of ``model`` with ``strategy`` on every prefill, until removed.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A supported vision-language model (see ``SUPPORTED``).
    strategy : str, Compressor or list of tuples
        A registered name (then ``params`` are its parameters), a ready instance, or a schedule:
        ``[(strategy, budget), (strategy, budget, params), ...]`` with at most one pre-LLM stage and any
        number of in-LLM stages (each at its strategy's ``layer``), e.g. the ApET authors' LLaVA-1.5
        setting ``[("apet", 288), ("apet-llm", 96)]``.
    budget : int or float
        Visual tokens kept: per image before the LLM; per prompt row (all its images together) inside
        it. ``None`` for a schedule, and for strategies that set their own per-layer budgets
        (``stage_budgets``, e.g. PyramidDrop).
    point : str, optional
        Where pre-LLM compression acts. LLaVA: ``"pre_projector"`` (default, the ApET authors' choice)
        or ``"post_projector"``. Qwen2(.5)-VL: ``"post_merger"`` (default, the merged visual tokens).
    allow_eager_fallback : bool
        Strategies that read attention weights (the vision tower's [CLS] row, or the LLM's attention at
        a layer) need eager attention there. When the model runs SDPA / FlashAttention, switch only that
        module to eager for the call and back; without this flag such a call raises.
    video : {"clip", "frame"}
        For video inputs: compress each clip as one token set (the budget per clip, ``grid = (t, h, w)``)
        or each frame on its own (the budget per frame).
    **params
        Strategy parameters, with a registered name only.

    Returns
    -------
    Handle
        ``handle.stats`` records each stage of each prefill; ``handle.remove()`` undoes everything.

    Raises
    ------
    TypeError
        Unsupported model class or strategy type.
    ValueError
        Bad budget, point, layer or schedule, or a strategy that needs context this model cannot supply.
    RuntimeError
        The model already has a compression applied.
    """
    integration = _integration(model)
    point = integration.check_point(point, model)
    if video not in ("clip", "frame"):
        raise InputError(f"tokencomp.apply: video must be 'clip' or 'frame'; got {video!r}.")
    if isinstance(strategy, (list, tuple)):
        if budget is not None or params:
            raise InputError("tokencomp.apply: with a schedule, give each stage's budget and parameters inside it.")
        entries = []
        for entry in strategy:
            if not isinstance(entry, tuple) or len(entry) not in (2, 3):
                raise InputError(
                    "tokencomp.apply: a schedule entry must be (strategy, budget) or (strategy, budget, params); "
                    f"got {entry!r}."
                )
            entries.append((_compressor(entry[0], dict(entry[2]) if len(entry) == 3 else {}), entry[1]))
    else:
        entries = [(_compressor(strategy, params), budget)]
    pre = [(c, b) for c, b in entries if c.stage == "pre_llm"]
    if len(pre) > 1:
        raise InputError("tokencomp.apply: a schedule takes at most one pre-LLM stage.")
    for c, b in pre:
        check_budget(apply_owner(c), b)
    stages = [s for c, b in entries if c.stage == "in_llm" for s in _in_llm_stages(c, b)]
    description = " -> ".join(f"{c.display_name()}({b})" for c, b in entries)
    handle = Handle(model, description)
    try:
        compressor, pre_budget = pre[0] if pre else (None, None)
        integration(model, compressor, pre_budget, stages, point, allow_eager_fallback, handle, video=video).install()
    except BaseException:
        handle.remove()
        raise
    return handle
