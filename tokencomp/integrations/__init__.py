"""Running strategies inside Hugging Face ``transformers`` vision-language models.

``tokencomp.apply(model, strategy, budget=..., **params)`` installs hooks on the model and returns a
:class:`Handle`; ``handle.remove()`` (or leaving a ``with`` block) restores it exactly. The model's
weights are never touched.
"""

from __future__ import annotations

from typing import Any, Union

from ..base import Compressor
from ..registry import create
from .handle import Handle
from .llava import POINTS, LlavaPreLLM

__all__ = ["Handle", "apply", "SUPPORTED"]

# transformers class name -> installer
SUPPORTED = {"LlavaForConditionalGeneration": LlavaPreLLM}


def _installer(model: Any) -> type:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    raise TypeError(
        f"tokencomp.apply: {type(model).__name__} is not supported yet; supported model classes: "
        f"{', '.join(sorted(SUPPORTED))}."
    )


def apply(
    model: Any,
    strategy: Union[str, Compressor],
    budget: int | float,
    *,
    point: str = "pre_projector",
    allow_eager_fallback: bool = False,
    **params: Any,
) -> Handle:
    """Compress the visual tokens of ``model`` with ``strategy`` on every prefill, until removed.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A supported vision-language model (see ``SUPPORTED``).
    strategy : str or Compressor
        A registered name (then ``params`` are its parameters) or a ready instance.
    budget : int or float
        Visual tokens kept per image: ``int >= 1`` or a fraction in ``(0, 1]``.
    point : {"pre_projector", "post_projector"}
        LLaVA: compress the vision features before the multimodal projector (the ApET authors' choice)
        or the projector's output.
    allow_eager_fallback : bool
        Strategies that read the vision tower's attention need eager attention there; when the model
        runs SDPA / FlashAttention, switch only the vision tower to eager for each call and back.
    **params
        Strategy parameters, with a registered name only.

    Returns
    -------
    Handle
        ``handle.stats`` records each prefill; ``handle.remove()`` undoes everything.

    Raises
    ------
    TypeError
        Unsupported model class.
    ValueError
        Bad budget, point or strategy, or a strategy that needs context this model cannot supply.
    RuntimeError
        The model already has a compression applied.
    """
    install = _installer(model)
    if isinstance(strategy, Compressor):
        if params:
            raise ValueError(
                f"tokencomp.apply: parameters {sorted(params)} were given with a ready {type(strategy).__name__} "
                "instance; pass the strategy's name instead, or set them on the instance."
            )
        compressor = strategy
    elif isinstance(strategy, str):
        compressor = create(strategy, **params)
    else:
        raise TypeError(f"tokencomp.apply: strategy must be a registered name or a Compressor; got {type(strategy).__name__}.")
    if point not in POINTS:
        raise ValueError(f"tokencomp.apply: point must be one of {', '.join(POINTS)}; got {point!r}.")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool):
        raise ValueError(f"tokencomp.apply: budget must be an int >= 1 or a fraction in (0, 1]; got {budget!r}.")
    if compressor.stage != "pre_llm":
        raise ValueError(
            f"tokencomp.apply: {compressor.display_name()!r} runs inside the language model (stage "
            f"{compressor.stage!r}); this version applies pre-LLM strategies only."
        )
    handle = Handle(model, f"{compressor.display_name()} budget={budget} at {point}")
    try:
        install(model, compressor, budget, point, allow_eager_fallback, handle).install()
    except BaseException:
        handle.remove()
        raise
    return handle
