"""What every model family's integration shares: construction, points, context supply, stats, hooks.

A family (:mod:`~tokencomp.integrations.llava`, :mod:`~tokencomp.integrations.llava_next`,
:mod:`~tokencomp.integrations.qwen2_vl`) subclasses :class:`Integration`, declares its ``points``,
``supplied`` context and ``family`` name, and implements a few hooks:

- :meth:`Integration.vision_hooks`: the hooks on the vision side (where the image features come from);
- :meth:`Integration.prefill`: compress the prompt's images and videos and shorten the prompt (how the
  kept tokens are placed, and their positions);
- optionally :meth:`Integration.decode_step` (positions of a decoding step), :meth:`Integration.check_stages`,
  :meth:`Integration.call_arguments`, :meth:`Integration.check_context` and :meth:`Integration.abandon`.

The base class installs the language-side hooks (prefill detection, decoding translation, the stats
record) and the in-LLM stages (:class:`~tokencomp.integrations.decoder.DecoderStages`), and gives the
families the shared pieces of a prefill: the encoder outputs (:meth:`Integration.encoded`), one item's
compression with the clip / frame split of videos (:meth:`Integration.compress_item`), the shortened
prompt (:meth:`Integration.shorten_ids`). Statistics go through one recorder,
:class:`~tokencomp.integrations.handle.PrefillStats`; the context check is
:func:`~tokencomp.integrations.budget.check_supplied`.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, ClassVar, Optional

import torch

from ..base import Compressor
from ..errors import InputError
from ..types import Context
from .budget import check_fits, check_supplied
from .decoder import DecoderStages, Stage
from .handle import Handle, PrefillStats
from .sequence import Shortening, translate_decode


class Integration:
    """Hooks that run a pre-LLM ``compressor`` on a model's visual tokens and in-LLM ``stages`` in its decoder.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model; ``model.model`` holds the vision tower and the language model.
    compressor : Compressor or None
        The pre-LLM strategy, or ``None`` for in-LLM stages only.
    budget : int, float or None
        The pre-LLM budget, per image (per clip or frame for videos).
    stages : list of Stage
        The in-LLM stages.
    point : str
        One of :attr:`points`.
    allow_eager_fallback : bool
        Switch a module to eager attention for the call when a strategy reads its weights.
    handle : Handle
        Collects the undo steps and the statistics.
    video : {"clip", "frame"}
        Compress each clip as one token set or each frame on its own.
    """

    #: Where pre-LLM compression may act; the first is the default.
    points: ClassVar[tuple[str, ...]] = ()
    #: The context fields the pre-LLM side supplies.
    supplied: ClassVar[tuple[str, ...]] = ("grid", "text_embeddings")
    #: The family's name in messages.
    family: ClassVar[str] = ""
    #: Whether in-LLM stages may renumber the kept tokens' positions (False for M-RoPE).
    renumber: ClassVar[bool] = True

    def __init__(
        self,
        model: Any,
        compressor: Optional[Compressor],
        budget: Optional[int | float],
        stages: list[Stage],
        point: str,
        allow_eager_fallback: bool,
        handle: Handle,
        video: str = "clip",
    ) -> None:
        self.model, self.compressor, self.budget, self.point = model, compressor, budget, point
        self.video = video
        self.allow_eager_fallback = allow_eager_fallback
        self.handle = handle
        self.inner = model.model
        self.stats = PrefillStats(handle)
        self.state: Optional[Shortening] = None
        self.visual: Optional[torch.Tensor] = None  # [B, L] visual positions of the prompt the LLM sees
        self.mask2d: Optional[torch.Tensor] = None
        self._prefilled = False
        if compressor is not None:
            self.check_context()
        self.check_stages(stages)
        self.decoder = (
            DecoderStages(
                self.inner.language_model,
                stages,
                allow_eager_fallback,
                handle,
                visual_mask=lambda: self.visual,
                key_mask=lambda: self.mask2d,
                renumber=self.renumber,
            )
            if stages
            else None
        )

    @property
    def _compressor(self) -> Compressor:
        """``compressor``, in the code that runs only with a pre-LLM strategy (its checks, hooks and prefill)."""
        assert self.compressor is not None, "tokencomp: the pre-LLM side ran without a pre-LLM strategy"
        return self.compressor

    @property
    def _budget(self) -> int | float:
        """``budget``, in the code that runs only with a pre-LLM strategy (``apply`` checked it is given)."""
        assert self.budget is not None, "tokencomp: a pre-LLM strategy ran without a budget"
        return self.budget

    @classmethod
    def check_point(cls, point: Optional[str], model: Any) -> str:
        """``point``, or the default one when ``None``; raise ``InputError`` if the family has no such point."""
        if point is None:
            return cls.points[0]
        if point not in cls.points:
            raise InputError(
                f"tokencomp.apply: point must be one of {', '.join(cls.points)} for {type(model).__name__}; "
                f"got {point!r}."
            )
        return point

    # ------------------------------------------------------------------ family hooks
    def check_context(self) -> None:
        """Raise ``InputError`` if the pre-LLM strategy needs context this family does not supply."""
        check_supplied(self._compressor, self.supplied, f"{type(self.model).__name__} pre-LLM integration")

    def check_stages(self, stages: list[Stage]) -> None:
        """Raise ``InputError`` for in-LLM stages the family cannot run (none by default)."""

    def vision_hooks(self) -> list[Any]:
        """Install the vision-side hooks; returns their removable handles."""
        return []

    def call_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The model's call as keyword arguments (positional ones raise ``TypeError``)."""
        if args:
            raise TypeError(f"tokencomp: call the {self.family} model with keyword arguments (input_ids=..., ...).")
        return args, kwargs

    def prefill(self, module: Any, kwargs: dict, input_ids: torch.Tensor) -> dict:
        """Compress the prompt's visual items; return the model's ``kwargs`` for the shortened prompt.

        ``module`` is the inner model (``model.model``), whose family's methods the families call by name."""
        raise NotImplementedError

    def decode_step(self, kwargs: dict, past: int, new: int) -> dict:
        """A decoding step's mask and positions translated to the shortened prompt (1-D positions)."""
        assert self.state is not None  # _before_model translates only after a shortened prefill
        mask, positions, matched = translate_decode(
            self.state, kwargs.get("attention_mask"), kwargs.get("position_ids"), past, new
        )
        if matched:
            kwargs["attention_mask"], kwargs["position_ids"] = mask, positions
        return kwargs

    def abandon(self) -> None:
        """After a failed prefill: drop what it had counted and decided."""
        self.stats.reset()
        self._prefilled = False
        self.state, self.visual, self.mask2d = None, None, None

    # ------------------------------------------------------------------ installation
    def install(self) -> None:
        """Install every hook; ``handle.remove()`` takes them off."""
        hooks = self.vision_hooks() if self.compressor is not None else []
        hooks.append(self.inner.register_forward_pre_hook(self._before_model, with_kwargs=True))
        hooks.append(self.inner.register_forward_hook(self._after_model))
        for hook in hooks:
            self.handle.on_remove(hook.remove)
        if self.decoder is not None:
            self.decoder.install()

    def visual_token_ids(self, device: torch.device) -> torch.Tensor:
        """The image (and video) placeholder ids of the model."""
        config = self.model.config
        ids = [config.image_token_id] + [v for v in [getattr(config, "video_token_id", None)] if v is not None]
        return torch.tensor(ids, device=device)

    def _before_model(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = self.call_arguments(args, kwargs)
        input_ids = kwargs.get("input_ids")
        visual_ids = None if input_ids is None else self.visual_token_ids(input_ids.device)
        if input_ids is not None and visual_ids is not None and bool(torch.isin(input_ids, visual_ids).any()):
            if self.compressor is not None:
                self.stats.begin()
                try:
                    kwargs = self.prefill(module, kwargs, input_ids)
                except BaseException:
                    self.abandon()
                    raise
                self._prefilled = True
            self.visual = torch.isin(kwargs["input_ids"], visual_ids)
            self.mask2d = kwargs.get("attention_mask")
            return args, kwargs
        cache = kwargs.get("cache")
        if cache is None or input_ids is None or cache.get_seq_length() == 0:
            self.state, self.visual, self.mask2d = None, None, None
        elif self.state is not None:
            kwargs = self.decode_step(kwargs, cache.get_seq_length(), input_ids.shape[1])
        return args, kwargs

    def _after_model(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._prefilled:  # features compressed by an earlier call (generate encodes once) are counted here too
            self._prefilled = False
            self.stats.flush()

    # ------------------------------------------------------------------ shared pieces of a prefill
    @staticmethod
    def own_outputs(kwargs: dict) -> dict:
        """The call's ``mm_encoder_outputs`` as a dict of our own (``generate`` keeps its dict for later steps)."""
        kwargs["mm_encoder_outputs"] = dict(kwargs.get("mm_encoder_outputs") or {})
        return kwargs["mm_encoder_outputs"]

    @staticmethod
    def encoded(kwargs: dict, name: str, inputs: tuple[str, ...], encode: Callable[[], Any]) -> list:
        """The features of the prompt's ``name`` items (``"image"`` / ``"video"``): ``encode()`` them unless
        the call brings them (``mm_encoder_outputs``, see :meth:`own_outputs`); the pixels, ``inputs[0]``,
        are then dropped from the call."""
        encoded = kwargs["mm_encoder_outputs"]
        if encoded.get(name) is None:
            if any(kwargs.get(key) is None for key in inputs):
                raise InputError(
                    f"tokencomp: the prompt has {name} tokens but no {' with '.join(inputs)}, nor mm_encoder_outputs; "
                    "pass the processor's outputs."
                )
            encoded[name] = encode()
        kwargs[inputs[0]] = None
        return list(encoded[name].pooler_output)

    @staticmethod
    def replace_output(kwargs: dict, name: str, **fields: Any) -> None:
        """Hand the model a copy of ``name``'s encoder output with ``fields`` replaced (``generate`` reuses
        its own output on every step)."""
        output = copy.copy(kwargs["mm_encoder_outputs"][name])
        for key, value in fields.items():
            setattr(output, key, value)
        kwargs["mm_encoder_outputs"][name] = output

    def shorten_ids(self, state: Shortening, kwargs: dict, input_ids: torch.Tensor) -> None:
        """Keep ``state`` for the decoding steps and hand the model the shortened ``input_ids``."""
        self.state = state
        pad = self.model.config.text_config.pad_token_id
        kwargs["input_ids"] = state.apply(input_ids, fill=0 if pad is None else pad)

    def compress_item(
        self,
        tokens: torch.Tensor,
        frames: int,
        frame_grid: Optional[tuple],
        grid: Optional[tuple],
        where: str,
        unit: str = "image",
        text: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compress one image or video clip ``tokens`` ``[N, D]`` (``frames`` frames of ``N / frames``).

        A video (``unit="video clip"``) is one call with ``grid`` (``video="clip"``, the budget per clip) or
        one batched call over its frames with ``frame_grid`` (``video="frame"``, the budget per frame).
        ``text`` ``[T, D]`` is the item's instruction. The call is counted in :attr:`stats`.

        Returns
        -------
        tuple of torch.Tensor
            ``(indices [K], tokens [K, D], assignment [N])`` in the item's token order.
        """
        compressor, budget = self._compressor, self._budget
        n, d = tokens.shape
        by_frame = unit == "video clip" and self.video == "frame"
        if by_frame:
            check_fits(compressor, budget, n // frames, f"each frame of {where}", unit="frame")
        else:
            check_fits(compressor, budget, n, where, unit=unit)
        start = time.perf_counter()
        if by_frame:
            texts = None if text is None else text.expand(frames, *text.shape)
            result = compressor.compress(
                tokens.view(frames, n // frames, d), budget, Context(grid=frame_grid, text_embeddings=texts)
            )
            frame = torch.arange(frames, device=tokens.device)[:, None]
            indices, values = (result.indices + frame * (n // frames)).reshape(-1), result.tokens.reshape(-1, d)
            slots = frame * result.indices.shape[1]
            assignment = torch.where(result.assignment >= 0, result.assignment + slots, -1).reshape(-1)
        else:
            result = compressor.compress(tokens, budget, Context(grid=grid, text_embeddings=text))
            indices, values, assignment = result.indices, result.tokens, result.assignment
        self.stats.count("pre_llm", compressor, start, n, values.shape[0])
        return indices, values, assignment
