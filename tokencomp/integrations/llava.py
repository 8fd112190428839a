"""LLaVA-1.5 (``LlavaForConditionalGeneration``): compress the image features before the language model.

Where: on the vision features that enter the multimodal projector (``point="pre_projector"``, as the
ApET authors do) or on the projector's output (``point="post_projector"``), one compression call per
batch of images (all of LLaVA-1.5's images have the same ``N``). The prompt's image-placeholder runs are
then shortened to the budget, and every later decoding step is translated to the shorter layout
(:mod:`tokencomp.integrations.sequence`), so ``generate`` with the KV cache stays correct.

Context supplied to the strategy: ``grid`` (the square patch grid) and, for strategies that read it,
``cls_attention``: the [CLS] row of the attention in the vision layer whose output LLaVA uses
(``vision_feature_layer``), averaged over heads, without the [CLS] column (CLIP towers and DINOv2 ones,
whose layers are ``encoder.layer[i].attention``). That needs eager attention in
the vision tower; under SDPA / FlashAttention the call raises unless ``allow_eager_fallback=True``, which
switches the vision tower to eager attention for the call and back.

LLaVA-NeXT, OneVision and NeXT-Video (any-res packing, newline tokens, videos) subclass this one in
:mod:`tokencomp.integrations.llava_next`; both share the vision side ([CLS] attention, eager fallback).
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar, Optional

import torch

from ..errors import AttentionUnavailableError, InputError
from ..types import Context
from .base import Integration, check_supplied
from .budget import check_fits
from .sequence import Shortening, instruction_embeddings, placeholder_keep, positions_from_mask


class LlavaIntegration(Integration):
    """Hooks that run a pre-LLM ``compressor`` on LLaVA's image features and in-LLM ``stages`` in its decoder."""

    points: ClassVar[tuple[str, ...]] = ("pre_projector", "post_projector")
    supplied = ("grid", "cls_attention", "text_embeddings")
    family = "LLaVA"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cls_attention: Optional[torch.Tensor] = None
        self._restore_attn: Optional[str] = None  # the vision tower's attention while switched to eager
        super().__init__(*args, **kwargs)

    @property
    def _late(self) -> bool:
        """Text-conditioned strategies run once the prompt is known, on the projector's output: the
        instruction's embeddings (the language model's input embeddings) live in that space."""
        return self.compressor is not None and "text_embeddings" in self.compressor.requires

    # ------------------------------------------------------------------ checks
    def check_context(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if "cls_attention" in self._compressor.requires and strategy != "default":
            raise InputError(
                f"tokencomp.apply: {self._compressor.display_name()!r} reads the vision tower's [CLS] attention, but "
                f"this model's features keep every vision token (vision_feature_select_strategy={strategy!r}; "
                "e.g. a SigLIP tower has no [CLS] token); choose a strategy without cls_attention."
            )
        check_supplied(self._compressor, self.supplied, f"{type(self.model).__name__} pre-LLM integration")
        self._check_late()

    def _check_late(self) -> None:
        if self._late and self.point != "post_projector":
            raise InputError(
                f"tokencomp.apply: {self._compressor.display_name()!r} scores the tokens against the instruction's "
                "embeddings, which live in the language model's space; pass point='post_projector'."
            )

    def call_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) == 1 and "input_ids" not in kwargs:
            return (), {"input_ids": args[0], **kwargs}  # LLaVA-NeXT passes input_ids by position
        return super().call_arguments(args, kwargs)

    # ------------------------------------------------------------------ the vision side
    def vision_hooks(self) -> list[Any]:
        vision = self.inner.vision_tower
        hooks = [
            vision.register_forward_pre_hook(self._vision_start),
            vision.register_forward_hook(self._vision_end, always_call=True),  # also when it raises
        ]
        if "cls_attention" in self._compressor.requires:
            hooks.append(self._attention_layer().register_forward_hook(self._capture_attention))
        return hooks + self.feature_hooks()

    def feature_hooks(self) -> list[Any]:
        """LLaVA-1.5: compress on the projector's input or output (text-conditioned: in :meth:`prefill`)."""
        projector = self.inner.multi_modal_projector
        if self._late:
            return []  # compressed in prefill, where the instruction is known
        if self.point == "pre_projector":
            return [projector.register_forward_pre_hook(self._compress_projector_input)]
        return [projector.register_forward_hook(self._compress_projector_output)]

    def _attention_layer(self) -> torch.nn.Module:
        """The self-attention module of the vision layer whose output LLaVA uses.

        CLIP and SigLIP towers keep it in ``encoder.layers[i].self_attn``, DINOv2 in
        ``encoder.layer[i].attention``; both return ``(output, weights)`` (weights only under eager).
        """
        tower = self.inner.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps it in older layouts
        encoder = tower.encoder
        layers = encoder.layers if hasattr(encoder, "layers") else encoder.layer
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise InputError(
                f"tokencomp.apply: [CLS] attention needs a single vision_feature_layer; this model uses "
                f"{feature_layer!r}."
            )
        # hidden_states[i] is the output of encoder layer i - 1 (hidden_states[0] are the embeddings).
        index = feature_layer % (len(layers) + 1) - 1
        if index < 0:
            raise InputError("tokencomp.apply: vision_feature_layer selects the embeddings; they have no attention.")
        layer = layers[index]
        return layer.self_attn if hasattr(layer, "self_attn") else layer.attention

    def _vision_start(self, module: torch.nn.Module, args: tuple) -> None:
        self.stats.begin()  # counters add up until the prefill is recorded
        self._cls_attention = None
        if "cls_attention" in self._compressor.requires and self.allow_eager_fallback:
            config: Any = module.config  # the tower's PretrainedConfig (nn.Module types it Tensor | Module)
            self._restore_attn = config._attn_implementation
            config._attn_implementation = "eager"

    def _vision_end(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        restore, self._restore_attn = self._restore_attn, None
        if restore is not None:
            config: Any = module.config  # the tower's PretrainedConfig (nn.Module types it Tensor | Module)
            config._attn_implementation = restore

    def _capture_attention(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            implementation = self.inner.vision_tower.config._attn_implementation
            raise AttentionUnavailableError(
                f"tokencomp: strategy {self._compressor.display_name()!r} reads the vision tower's [CLS] "
                f"attention, but the vision tower runs {implementation!r} attention, which returns no weights. "
                "Load the model with attn_implementation='eager', or pass allow_eager_fallback=True to "
                "tokencomp.apply to switch the vision tower to eager attention for each call."
            )
        self._cls_attention = weights[:, :, 0, 1:].float().mean(dim=1)  # [images, N]

    def abandon(self) -> None:
        """Also switch the vision tower back if the failed prefill had made it eager."""
        restore, self._restore_attn = self._restore_attn, None
        if restore is not None:
            self.inner.vision_tower.config._attn_implementation = restore
        super().abandon()

    # ------------------------------------------------------------------ LLaVA-1.5's compression
    def _context(self, n: int, text: Optional[torch.Tensor] = None) -> Context:
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else None
        cls = self._cls_attention
        if cls is not None and cls.shape[1] != n:
            cls = None  # the feature selection kept the [CLS] token ("full"): no [CLS]-free row to give
            if "cls_attention" in self._compressor.requires:
                raise InputError(
                    "tokencomp.apply: [CLS] attention needs vision_feature_select_strategy='default' "
                    "(features without the [CLS] token)."
                )
        return Context(grid=grid, cls_attention=cls, text_embeddings=text)

    def _compress(self, features: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        where = f"each of the {features.shape[0]} image(s) of this batch (LLaVA-1.5 gives every image the same count)"
        compressor = self._compressor
        check_fits(compressor, self._budget, features.shape[1], where)
        start = time.perf_counter()
        result = compressor.compress(features, self._budget, self._context(features.shape[1], text))
        self.stats.count(
            "pre_llm",
            compressor,
            start,
            features.shape[0] * features.shape[1],
            result.tokens.shape[0] * result.tokens.shape[1],
        )
        return result.tokens

    def _compress_projector_input(self, module: torch.nn.Module, args: tuple) -> tuple:
        return (self._compress(args[0]),) + tuple(args[1:])

    def _compress_projector_output(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self._compress(output)

    def place_images(
        self, module: Any, kwargs: dict, input_ids: torch.Tensor, token_id: int, features: list
    ) -> torch.Tensor:
        """``[B, L]`` bool: the image placeholders kept for the (compressed) ``features`` of the images."""
        if self._late:
            features = self._compress_with_instruction(module, kwargs, input_ids, token_id, features)
        kept = features[0].shape[0]
        if any(f.shape[0] != kept for f in features):
            raise InputError("tokencomp: images of one LLaVA batch must keep the same number of features.")
        per_image = int((input_ids == token_id).sum()) // len(features)
        return placeholder_keep(input_ids, token_id, per_image, kept)

    def _compress_with_instruction(
        self, module: Any, kwargs: dict, input_ids: torch.Tensor, token_id: int, features: list
    ) -> list:
        """Compress the projected features of every image against its row's instruction embeddings."""
        visual = input_ids == token_id
        text = instruction_embeddings(module.get_input_embeddings(), input_ids, visual)  # [B, T, D]
        per_image = features[0].shape[0]
        images_per_row = visual.sum(dim=1) // per_image
        rows = torch.repeat_interleave(torch.arange(input_ids.shape[0], device=input_ids.device), images_per_row)
        stacked = torch.stack(features)
        tokens = list(self._compress(stacked, text[rows].to(stacked.dtype)))
        self.replace_output(kwargs, "image", pooler_output=tokens)
        return tokens

    # ------------------------------------------------------------------ the prompt
    def prefill(self, module: Any, kwargs: dict, input_ids: torch.Tensor) -> dict:
        self.own_outputs(kwargs)
        return self._shorten(kwargs, input_ids, self.visual_keep(module, kwargs, input_ids))

    def visual_keep(self, module: Any, kwargs: dict, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: the prompt's columns kept (LLaVA-1.5: its images)."""
        return self._compress_images(module, kwargs, input_ids, self.model.config.image_token_id)

    def _compress_images(self, module: Any, kwargs: dict, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
        """``[B, L]`` bool: the image placeholders kept (every other column True)."""
        features = self.encoded(
            kwargs,
            "image",
            ("pixel_values",),
            lambda: module.get_image_features(
                pixel_values=kwargs["pixel_values"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"),
                return_dict=True,
            ),
        )
        return self.place_images(module, kwargs, input_ids, token_id, features)

    def _shorten(self, kwargs: dict, input_ids: torch.Tensor, keep: torch.Tensor) -> dict:
        """The call for the prompt's ``keep`` columns, 1-D positions renumbered from the shortened mask."""
        state = Shortening.from_keep(keep)
        self.shorten_ids(state, kwargs, input_ids)
        mask = kwargs.get("attention_mask")
        if mask is None and bool((state.source < 0).any()):
            mask = torch.ones_like(input_ids)  # rows were re-padded: the model needs to know where
        if mask is not None:
            kwargs["attention_mask"] = state.apply(mask, fill=0)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = (
                positions_from_mask(kwargs["attention_mask"])
                if mask is not None
                else torch.arange(kwargs["input_ids"].shape[1], device=input_ids.device).expand_as(kwargs["input_ids"])
            )
        return kwargs


def __getattr__(name: str) -> Any:
    """``LlavaNextIntegration`` stays importable from here; it lives in :mod:`.llava_next`."""
    if name == "LlavaNextIntegration":
        from .llava_next import LlavaNextIntegration

        return LlavaNextIntegration
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
