"""In-LLM stages: drop visual positions from a decoder's hidden states at a layer during prefill.

A stage at layer ``l`` acts on the hidden states entering decoder layer ``l`` (0-based), i.e. after ``l``
layers have run. Its strategy gets the visual tokens' hidden states and the context it ``requires``,
computed from the model at that point:

- ``text_attention``: the last token's head-averaged attention to the visual tokens in layer ``l - 1``
  (eager attention weights, as FastV reads them);
- ``cross_attention``: the same layer's head-averaged attention of the text tokens after the last visual
  token (the instruction; the last ``T`` of them, ``T`` the shortest such tail in the batch) to the
  visual tokens (SparseVLM's raters);
- ``query`` / ``keys``: layer ``l``'s own projections of the last token's query and every key, rotary
  applied (PyramidDrop computes its one attention row from them);
- ``keys`` for strategies that also require ``hidden_states`` (DART): layer ``l - 1``'s keys; and
  ``hidden_states`` the whole sequence after the model's final norm;
- ``visual_positions``, ``key_mask`` (the prompt's padding), ``layer``;
- ``schedule_n``, for strategies that set their own per-layer budgets: the visual tokens entering their
  first stage (the ``n`` of ``stage_budgets(n)``);
- the strategy's :attr:`~tokencomp.Compressor.carries` (e.g. SparseVLM's ``raters``): from the second
  stage of a compressor on, what its previous stage returned in ``info`` under those names.

From layer ``l`` on, every layer sees the shorter sequence: the hidden states are cut at ``l``; the
attention mask, rotary embeddings and position ids handed to each later layer are cut the same way, in
prefill and in every decoding step (whose keys and values in those layers' cache are the shorter
sequence). Kept tokens keep their original positions (``in_llm_positions="keep"``: FastV, DART) unless
the strategy's ``in_llm_positions``, read from the instance, is ``"renumber"`` (ApET's stage 2,
SparseVLM, PyramidDrop by default), then later layers number the shorter sequence ``0 .. L' - 1`` and
decoding continues from ``L'``: after several cuts, each decoding step's position at a layer is moved
down by every token the cuts up to that layer dropped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

import torch

from ..base import Compressor
from ..errors import AttentionUnavailableError, InputError
from ..types import Context
from .budget import check_fits, check_supplied
from .handle import Handle, PrefillStats

# the Context fields an in-LLM stage is given (no grid: after a pre-LLM cut the kept tokens form none)
SUPPLIED = (
    "text_attention",
    "cross_attention",
    "query",
    "keys",
    "hidden_states",
    "visual_positions",
    "key_mask",
    "layer",
    "schedule_n",
)


@dataclass
class Stage:
    """One in-LLM stage: ``compressor`` keeps ``budget`` visual tokens per row at decoder layer ``layer``."""

    compressor: Compressor
    budget: Any  # int, float, or a callable from the visual tokens entering the stage to an int
    layer: int


@dataclass
class _Prefill:
    """What one prefill decided: per stage, the original positions kept (``[B, L_s]``)."""

    visual: torch.Tensor  # [B, L] bool, visual positions of the prompt entering the decoder
    length: int
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L_s] original positions
    renumber: dict[int, bool] = field(default_factory=dict)
    first_n: dict[int, int] = field(default_factory=dict)  # id(compressor) -> visual tokens entering its first stage
    carried: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(compressor) -> its last stage's carries


def _gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` indexed along ``dim`` by the per-row ``idx`` ``[B, M]`` (``x``'s batch dimension is 0)."""
    b = idx.shape[0]
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = b, idx.shape[1]
    view = idx.view(shape)
    size = list(x.shape)
    size[dim] = idx.shape[1]
    return x.gather(dim, view.expand(size))


class DecoderStages:
    """Hooks on a decoder-only language model (``layers``, ``norm``, ``rotary_emb``) running in-LLM stages."""

    def __init__(
        self,
        language_model: torch.nn.Module,
        stages: list[Stage],
        allow_eager_fallback: bool,
        handle: Handle,
        visual_mask: Callable[[], Optional[torch.Tensor]],
        key_mask: Callable[[], Optional[torch.Tensor]],
        renumber: bool = True,
    ) -> None:
        self.lm = language_model
        self.layers = cast(torch.nn.ModuleList, language_model.layers)  # nn.Module types it Tensor | Module
        self.stages = sorted(stages, key=lambda s: s.layer)
        self.allow_eager_fallback = allow_eager_fallback
        self.handle = handle
        self.stats = PrefillStats(handle)  # one record per stage of each prefill
        self.visual_mask, self.key_mask = visual_mask, key_mask
        self.renumber = renumber  # False for M-RoPE decoders: kept tokens always keep their positions
        self.prefill: Optional[_Prefill] = None
        self._attention: dict[int, torch.Tensor] = {}
        self._inputs: dict[int, tuple[torch.Tensor, Any]] = {}  # layer -> (its input, position_embeddings)
        self._slices: dict[tuple, Any] = {}
        self._restore: dict[int, str] = {}
        self._in_prefill = False
        for stage in self.stages:
            if not 1 <= stage.layer < len(self.layers):
                raise InputError(
                    f"tokencomp.apply: {stage.compressor.display_name()!r} at layer {stage.layer}, but the "
                    f"language model has {len(self.layers)} decoder layers; use a layer in [1, {len(self.layers) - 1}]."
                )
            check_supplied(stage.compressor, SUPPLIED, "in-LLM integration")
            if stage.compressor.output_order != "position":
                raise InputError(
                    f"tokencomp.apply: {stage.compressor.display_name()!r} at layer {stage.layer} returns its "
                    f"tokens in its own order (output_order={stage.compressor.output_order!r}), but inside the "
                    "language model the kept hidden states stay in sequence order; give it output_order "
                    "'position' (ascending indices)."
                )
        if len({s.layer for s in self.stages}) != len(self.stages):
            raise InputError("tokencomp.apply: two in-LLM stages at the same layer; give each stage its own layer.")

    # ------------------------------------------------------------------ installation
    def install(self) -> None:
        hooks = [self.lm.register_forward_pre_hook(self._start, with_kwargs=True)]
        first = self.stages[0].layer
        for j, layer in enumerate(self.layers):
            if j >= first:
                hooks.append(layer.register_forward_pre_hook(self._make_layer_hook(j), with_kwargs=True))
        for stage in self.stages:
            before = self.layers[stage.layer - 1]
            if {"text_attention", "cross_attention"} & set(stage.compressor.requires):
                attention: Any = before.self_attn  # nn.Module types it Tensor | Module
                hooks.append(
                    attention.register_forward_pre_hook(self._make_eager_switch(stage.layer - 1), with_kwargs=True)
                )
                # always_call: the eager switch is undone even when the layer raises
                hooks.append(attention.register_forward_hook(self._make_attention_capture(stage), always_call=True))
            if "keys" in stage.compressor.requires and "hidden_states" in stage.compressor.requires:
                capture = self._make_input_capture(stage.layer - 1)
                hooks.append(before.register_forward_pre_hook(capture, with_kwargs=True))
        hooks.append(self.lm.register_forward_hook(self._finish))
        for hook in hooks:
            self.handle.on_remove(hook.remove)

    # ------------------------------------------------------------------ per forward
    def _start(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._slices.clear()
        visual = self.visual_mask()
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1] if embeds is not None else None
        self._in_prefill = False
        if visual is not None and length is not None and visual.shape[1] == length:
            self._in_prefill = True
            self.prefill = _Prefill(visual=visual, length=length)
            self.stats.reset()
            self.stats.begin()
            self._attention.clear()
            self._inputs.clear()
        elif visual is None:
            self.prefill = None  # a call without images: nothing to cut

    def _finish(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._in_prefill and self.prefill is not None:
            self.stats.flush()

    # ------------------------------------------------------------------ captures
    def _make_eager_switch(self, j: int) -> Callable:
        def switch(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
            if not self._in_prefill:
                return None
            config: Any = module.config  # the model's PretrainedConfig (nn.Module types it Tensor | Module)
            implementation = config._attn_implementation
            if implementation == "eager" or not self.allow_eager_fallback:
                return None
            self._restore[j] = implementation
            config._attn_implementation = "eager"
            # SDPA / FlashAttention masks are not eager's: None means "causal", bool means "may attend".
            hidden = args[0] if args else kwargs["hidden_states"]
            return args, {**kwargs, "attention_mask": _additive_causal(kwargs.get("attention_mask"), hidden)}

        return switch

    def _make_attention_capture(self, stage: Stage) -> Callable:
        def capture(module: torch.nn.Module, args: tuple, output: Any) -> None:
            config: Any = module.config  # the model's PretrainedConfig (nn.Module types it Tensor | Module)
            restore = self._restore.pop(stage.layer - 1, None)
            if restore is not None:
                config._attn_implementation = restore
            if output is None or not self._is_prefill_call(module):  # None: the layer raised
                return
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise AttentionUnavailableError(
                    f"tokencomp: strategy {stage.compressor.display_name()!r} reads the language model's "
                    f"attention weights at layer {stage.layer - 1}, but the model runs "
                    f"{config._attn_implementation!r} attention, which returns none. Load the model "
                    "with attn_implementation='eager', or pass allow_eager_fallback=True to tokencomp.apply "
                    "to switch that one layer to eager attention during prefill."
                )
            if "cross_attention" in stage.compressor.requires:
                self._attention[stage.layer] = weights.float().mean(dim=1)  # [B, L, L]
            else:
                self._attention[stage.layer] = weights[:, :, -1:, :].float().mean(dim=1)  # [B, 1, L]

        return capture

    def _make_input_capture(self, j: int) -> Callable:
        def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if self._in_prefill:
                self._inputs[j] = (hidden, kwargs.get("position_embeddings"))

        return capture

    def _is_prefill_call(self, module: torch.nn.Module) -> bool:
        return self._in_prefill

    # ------------------------------------------------------------------ the layer hook
    def _make_layer_hook(self, j: int) -> Callable:
        stage = next((s for s in self.stages if s.layer == j), None)

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self.prefill is None:
                return args, kwargs
            if stage is not None and self._in_prefill:
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = self._run_stage(stage, module, hidden, self._cut(j - 1, kwargs, prefill=True))
                if args:
                    args = (hidden,) + tuple(args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": hidden}
            return args, self._cut(j, kwargs, prefill=self._in_prefill)

        return hook

    def _active(self, j: int) -> Optional[int]:
        """Layer of the last stage at or before layer ``j`` that has run in this prefill."""
        p = self.prefill
        layers = [s.layer for s in self.stages if s.layer <= j and p is not None and s.layer in p.kept]
        return max(layers) if layers else None

    def _run_stage(self, stage: Stage, layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        p = self.prefill
        assert p is not None  # the layer hook runs a stage only in a prefill
        previous = [s.layer for s in self.stages if s.layer < stage.layer and s.layer in p.kept]
        if previous:
            positions_now = p.kept[max(previous)]
        else:
            positions_now = torch.arange(p.length, device=hidden.device).expand(hidden.shape[0], -1)
        visual_now = p.visual.gather(1, positions_now)  # [B, L_now]
        counts = visual_now.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise InputError("tokencomp: rows of the batch hold different numbers of visual tokens.")
        n = int(counts[0])
        p.first_n.setdefault(id(stage.compressor), n)
        visual_idx = visual_now.float().argsort(dim=1, descending=True, stable=True)[:, :n].sort(dim=1).values
        tokens = _gather_rows(hidden, visual_idx, 1)
        context = self._context(stage, layer, hidden, kwargs, visual_idx, positions_now)
        start = time.perf_counter()
        budget = stage.budget(n) if callable(stage.budget) else stage.budget
        if not callable(stage.budget):
            where = f"every prompt row at decoder layer {stage.layer}"
            check_fits(stage.compressor, budget, n, where, unit="prompt row")
        result = stage.compressor.compress(tokens, budget, context)
        p.carried[id(stage.compressor)] = {k: result.info[k] for k in stage.compressor.carries if k in result.info}
        self.stats.count(
            f"in_llm@{stage.layer}",
            stage.compressor,
            start,
            int(counts.sum()),
            int(result.tokens.shape[0] * result.tokens.shape[1]),
        )
        # new sequence: every non-visual position plus the kept visual ones, in order
        keep = ~visual_now
        keep.scatter_(1, visual_idx.gather(1, result.indices), True)
        n_keep = int(keep.sum(dim=1)[0])
        order = keep.float().argsort(dim=1, descending=True, stable=True)[:, :n_keep].sort(dim=1).values
        new_hidden = _gather_rows(hidden, order, 1).clone()
        slot = _gather_rows(visual_now, order, 1)  # visual slots of the new sequence, in order
        new_hidden[slot] = result.tokens.to(new_hidden.dtype).reshape(-1, new_hidden.shape[-1])
        p.kept[stage.layer] = positions_now.gather(1, order)
        p.renumber[stage.layer] = self.renumber and getattr(stage.compressor, "in_llm_positions", "keep") == "renumber"
        return new_hidden

    def _context(
        self,
        stage: Stage,
        layer: torch.nn.Module,
        hidden: torch.Tensor,
        kwargs: dict,
        visual_idx: torch.Tensor,
        positions_now: torch.Tensor,
    ) -> Context:
        """The context ``stage``'s strategy requires, at the visual tokens ``visual_idx`` of ``hidden``."""
        need = set(stage.compressor.requires)
        fields: dict[str, Any] = {"layer": stage.layer, "visual_positions": visual_idx}
        key_mask = self.key_mask()
        if key_mask is not None:
            fields["key_mask"] = key_mask.bool().gather(1, positions_now)
        if "text_attention" in need:
            fields["text_attention"] = self._captured(stage, RuntimeError)[:, -1].gather(1, visual_idx)
        if "cross_attention" in need:
            fields["cross_attention"] = _cross_attention(self._captured(stage, AttentionUnavailableError), visual_idx)
        if "hidden_states" in need:
            fields["hidden_states"] = self.lm.norm(hidden)  # type: ignore[operator]  # norm: an nn.Module
        if "query" in need or "keys" in need:
            fields.update(self._projected(stage, need, layer, hidden, kwargs))
        fields = {k: v for k, v in fields.items() if k in need or k == "layer" or k == "key_mask" and "keys" in need}
        p = self.prefill
        assert p is not None  # stages run inside a prefill only
        if stage.compressor.sets_own_budgets():
            fields["schedule_n"] = p.first_n[id(stage.compressor)]
        fields.update(p.carried.get(id(stage.compressor), {}))  # from its previous stage, if any
        return Context(**fields)

    def _captured(self, stage: Stage, error: type[Exception]) -> torch.Tensor:
        """The attention weights captured in layer ``stage.layer - 1`` (``error`` when there are none)."""
        weights = self._attention.get(stage.layer)
        if weights is None:
            raise error(f"tokencomp: no attention weights were captured for layer {stage.layer - 1}.")
        return weights

    def _projected(self, stage: Stage, need: set, layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> dict:
        """``keys`` (and the last token's ``query``): layer ``stage.layer``'s own projections, or, for
        strategies that also read ``hidden_states`` (DART), those of the layer before."""
        if "hidden_states" in need and "keys" in need:
            source, embeddings = self._inputs.get(stage.layer - 1, (None, None))
            if source is None:
                raise RuntimeError(f"tokencomp: layer {stage.layer - 1}'s input was not captured.")
            source_layer = self.layers[stage.layer - 1]
        else:
            source, embeddings, source_layer = hidden, kwargs.get("position_embeddings"), layer
        query, keys = _projections(source_layer, source, embeddings)
        fields = {"keys": keys}
        if "query" in need:
            fields["query"] = query[:, :, -1]
        return fields

    # ------------------------------------------------------------------ cutting masks and positions
    def _cut(self, j: int, kwargs: dict, prefill: bool) -> dict:
        """``kwargs`` of a layer with mask and positions cut by the last stage at or before layer ``j``."""
        active = self._active(j)
        if active is None:
            return kwargs
        p = self.prefill
        assert p is not None  # _active found a stage that ran in this prefill
        kept = p.kept[active]  # [B, L_s]
        key = (active, prefill)
        if key not in self._slices:
            self._slices[key] = self._sliced(kwargs, kept, prefill, active)
        return {**kwargs, **self._slices[key]}

    def _sliced(self, kwargs: dict, kept: torch.Tensor, prefill: bool, active: int) -> dict:
        p = self.prefill
        assert p is not None  # called by _cut, for a stage that ran in this prefill
        out: dict[str, Any] = {}
        mask = kwargs.get("attention_mask")
        cos, sin = kwargs["position_embeddings"]
        if prefill:
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                out["attention_mask"] = _gather_rows(_gather_rows(mask, kept, 2), kept, 3)
            if p.renumber.get(active):
                # each kept token moves down by the number of tokens removed before it
                original = _gather_rows(_positions(kwargs, kept), kept, 1)
                removed_before = kept - torch.arange(kept.shape[1], device=kept.device)
                positions = original - removed_before
                out["position_ids"] = positions
                out["position_embeddings"] = self.lm.rotary_emb(cos, positions)  # type: ignore[operator]  # an nn.Module
            else:
                out["position_embeddings"] = (_gather_rows(cos, kept, 1), _gather_rows(sin, kept, 1))
                if kwargs.get("position_ids") is not None:
                    out["position_ids"] = _gather_rows(kwargs["position_ids"].expand(kept.shape[0], -1), kept, 1)
        else:
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                total = mask.shape[-1]
                tail = torch.arange(p.length, total, device=kept.device).expand(kept.shape[0], -1)
                out["attention_mask"] = _gather_rows(mask, torch.cat([kept, tail], dim=1), 3)
            if p.renumber.get(active):
                shift = p.length - kept.shape[1]
                ids = kwargs.get("position_ids")
                if ids is None:
                    raise RuntimeError("tokencomp: renumbered positions need position_ids in decoding steps.")
                positions = ids - shift
                out["position_ids"] = positions
                out["position_embeddings"] = self.lm.rotary_emb(cos, positions)  # type: ignore[operator]  # an nn.Module
        return out


def _additive_causal(mask: Optional[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The additive float mask eager attention expects, from an SDPA mask (``None`` = causal, or bool)."""
    length = hidden.shape[1]
    low = torch.finfo(hidden.dtype).min
    if mask is None:
        allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        return mask
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    return torch.where(allowed, zero, torch.full((), low, dtype=hidden.dtype, device=hidden.device))


def _cross_attention(weights: torch.Tensor, visual_idx: torch.Tensor) -> torch.Tensor:
    """``[B, T, N]``: the attention of the instruction's last ``T`` tokens (those after the last visual token,
    ``T`` the shortest such tail in the batch) to the visual tokens, from the ``[B, L, L]`` ``weights``."""
    tail = int((weights.shape[1] - 1 - visual_idx[:, -1]).min())  # text tokens after the last visual one
    if tail < 1:
        raise InputError("tokencomp: cross_attention needs text tokens after the image; the prompt has none.")
    rows = weights[:, -tail:, :]  # [B, T, L]
    return rows.gather(2, visual_idx[:, None, :].expand(-1, tail, -1))


def _positions(kwargs: dict, kept: torch.Tensor) -> torch.Tensor:
    """The layer's ``[B, L]`` position ids (``arange`` when the model passes none)."""
    ids = kwargs.get("position_ids")
    if ids is None:
        raise RuntimeError("tokencomp: renumbered positions need the decoder to pass position_ids to its layers.")
    return ids.expand(kept.shape[0], -1)


def _projections(layer: torch.nn.Module, hidden: torch.Tensor, embeddings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer's rotary-applied queries ``[B, H, L, Dh]`` and keys repeated to ``H`` heads ``[B, H, L, Dh]``."""
    attention: Any = layer.self_attn  # the layer's attention module (nn.Module types it Tensor | Module)
    rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    x = layer.input_layernorm(hidden)  # type: ignore[operator]  # an nn.Module
    b, length, _ = x.shape
    q = attention.q_proj(x).view(b, length, -1, attention.head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(b, length, -1, attention.head_dim).transpose(1, 2)
    cos, sin = embeddings
    q, k = rotary(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q.float(), k.float()
