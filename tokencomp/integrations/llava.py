"""LLaVA-1.5 (``LlavaForConditionalGeneration``): compress the image features before the language model.

Where: on the vision features that enter the multimodal projector (``point="pre_projector"``, as the
ApET authors do) or on the projector's output (``point="post_projector"``), one compression call per
batch of images (all of LLaVA-1.5's images have the same ``N``). The prompt's image-placeholder runs are
then shortened to the budget, and every later decoding step is translated to the shorter layout
(:mod:`tokencomp.integrations.sequence`), so ``generate`` with the KV cache stays correct.

Context supplied to the strategy: ``grid`` (the square patch grid) and, for strategies that read it,
``cls_attention``: the [CLS] row of the attention in the vision layer whose output LLaVA uses
(``vision_feature_layer``), averaged over heads, without the [CLS] column. That needs eager attention in
the vision tower; under SDPA / FlashAttention the call raises unless ``allow_eager_fallback=True``, which
switches the vision tower to eager attention for the call and back.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from typing import Any, Optional

import torch

from ..base import Compressor
from ..errors import AttentionUnavailableError, InputError
from ..types import Context
from .budget import check_fits
from .decoder import DecoderStages, Stage
from .handle import Handle
from .sequence import (
    Shortening,
    instruction_embeddings,
    item_rows,
    placeholder_keep,
    positions_from_mask,
    translate_decode,
)

POINTS = ("pre_projector", "post_projector")
SUPPLIED = ("grid", "cls_attention", "text_embeddings")


class LlavaIntegration:
    """Hooks that run a pre-LLM ``compressor`` on LLaVA's image features and in-LLM ``stages`` in its decoder."""

    points = POINTS

    def __init__(
        self, model: Any, compressor: Optional[Compressor], budget: Optional[int | float], stages: list[Stage],
        point: str, allow_eager_fallback: bool, handle: Handle, video: str = "clip",
    ) -> None:
        self.model, self.compressor, self.budget, self.point = model, compressor, budget, point
        self.video = video
        self.allow_eager_fallback = allow_eager_fallback
        self.handle = handle
        self.inner = model.model
        self.packed = hasattr(self.inner, "pack_image_features")  # LLaVA-NeXT family: any-res crops + newlines
        self.state: Optional[Shortening] = None
        self.visual: Optional[torch.Tensor] = None  # [B, L] image positions of the prompt the LLM sees
        self.mask2d: Optional[torch.Tensor] = None
        self._cls_attention: Optional[torch.Tensor] = None
        self._image_sizes: Optional[torch.Tensor] = None
        self._image_cls: Optional[torch.Tensor] = None
        self._pending: dict[str, Any] = {}
        # Text-conditioned strategies run once the prompt is known, on the projector's output: the
        # instruction's embeddings (the language model's input embeddings) live in that space.
        self._late = compressor is not None and "text_embeddings" in compressor.requires
        if compressor is not None:
            self._check_context_supply()
        if self._late and point != "post_projector" and not self.packed:
            raise InputError(
                f"tokencomp.apply: {compressor.display_name()!r} scores the tokens against the instruction's "
                "embeddings, which live in the language model's space; pass point='post_projector'."
            )
        self.decoder = (
            DecoderStages(self.inner.language_model, stages, allow_eager_fallback, handle,
                          visual_mask=lambda: self.visual, key_mask=lambda: self.mask2d)
            if stages else None
        )

    # ------------------------------------------------------------------ installation
    def install(self) -> None:
        hooks = []
        if self.compressor is not None:
            vision = self.inner.vision_tower
            hooks.append(vision.register_forward_pre_hook(self._vision_start))
            hooks.append(vision.register_forward_hook(self._vision_end, always_call=True))  # also when it raises
            if "cls_attention" in self.compressor.requires:
                hooks.append(self._attention_layer().register_forward_hook(self._capture_attention))
                if self.packed:
                    self._record_image_sizes()
            projector = self.inner.multi_modal_projector
            if self._late or self.packed:
                pass  # compressed in _prefill, where the instruction is known
            elif self.point == "pre_projector":
                hooks.append(projector.register_forward_pre_hook(self._compress_projector_input))
            else:
                hooks.append(projector.register_forward_hook(self._compress_projector_output))
        hooks.append(self.inner.register_forward_pre_hook(self._before_model, with_kwargs=True))
        hooks.append(self.inner.register_forward_hook(self._after_model))
        for hook in hooks:
            self.handle.on_remove(hook.remove)
        if self.decoder is not None:
            self.decoder.install()

    def _record_image_sizes(self) -> None:
        """Packed models: remember the ``image_sizes`` of each image encoding (``generate`` encodes the
        images before the forward, without them), to split the per-crop [CLS] rows per image."""
        inner = self.inner
        original = inner.get_image_features

        @functools.wraps(original)
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            self._image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            result = original(*args, **kwargs)
            self._image_cls = self._cls_attention  # a video encoding may run the tower again before forward
            return result

        inner.get_image_features = get_image_features  # an instance attribute over the class's method
        self.handle.on_remove(lambda: delattr(inner, "get_image_features"))

    def _packed_cls(self, module: torch.nn.Module, image: int, n: int) -> Optional[torch.Tensor]:
        """Image ``image``'s [CLS] attention laid out like its packed tokens (``[1, n]``, newlines excluded)."""
        if self._image_cls is None:
            return None
        sizes = self._image_sizes
        if sizes is None:
            raise InputError("tokencomp: [CLS] attention on an any-res model needs image_sizes.")
        helper = sys.modules[type(module).__module__].image_size_to_num_patches
        counts = [helper(image_size=s, grid_pinpoints=self.model.config.image_grid_pinpoints,
                         patch_size=self.model.config.vision_config.image_size) for s in sizes]
        rows = torch.split(self._image_cls, counts)[image]  # [crops, tokens per crop]
        packed, _ = module.pack_image_features(
            [rows[..., None]], sizes[image : image + 1],
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy, image_newline=None,
        )
        cls = packed[0][:, 0]
        if cls.shape[0] != n:
            raise InputError("tokencomp: the [CLS] rows do not line up with the packed image tokens.")
        return cls[None]

    def _check_context_supply(self) -> None:
        supplied = list(SUPPLIED)
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if "cls_attention" in self.compressor.requires and strategy != "default":
            raise InputError(
                f"tokencomp.apply: {self.compressor.display_name()!r} reads the vision tower's [CLS] attention, but "
                f"this model's features keep every vision token (vision_feature_select_strategy={strategy!r}; "
                "e.g. a SigLIP tower has no [CLS] token); choose a strategy without cls_attention."
            )
        missing = [f for f in self.compressor.requires if f not in supplied]
        if missing:
            raise InputError(
                f"tokencomp.apply: strategy {self.compressor.display_name()!r} needs context "
                f"{', '.join(missing)}, which the {type(self.model).__name__} pre-LLM integration does not supply "
                f"(it supplies {', '.join(supplied)}); choose a strategy that needs only those."
            )

    def _attention_layer(self) -> torch.nn.Module:
        tower = self.inner.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps it in older layouts
        layers = tower.encoder.layers
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
        return layers[index].self_attn

    # ------------------------------------------------------------------ vision side
    def _vision_start(self, module: torch.nn.Module, args: tuple) -> None:
        self._pending.setdefault("start", time.perf_counter())  # counters add up until the prefill is recorded
        self._cls_attention = None
        if "cls_attention" in self.compressor.requires and self.allow_eager_fallback:
            config = module.config
            self._pending["restore_attn"] = config._attn_implementation
            config._attn_implementation = "eager"

    def _vision_end(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        restore = self._pending.pop("restore_attn", None)
        if restore is not None:
            module.config._attn_implementation = restore

    def _capture_attention(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            implementation = self.inner.vision_tower.config._attn_implementation
            raise AttentionUnavailableError(
                f"tokencomp: strategy {self.compressor.display_name()!r} reads the vision tower's [CLS] "
                f"attention, but the vision tower runs {implementation!r} attention, which returns no weights. "
                "Load the model with attn_implementation='eager', or pass allow_eager_fallback=True to "
                "tokencomp.apply to switch the vision tower to eager attention for each call."
            )
        self._cls_attention = weights[:, :, 0, 1:].float().mean(dim=1)  # [images, N]

    def _context(self, n: int, text: Optional[torch.Tensor] = None) -> Context:
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else None
        cls = self._cls_attention
        if cls is not None and cls.shape[1] != n:
            cls = None  # the feature selection kept the [CLS] token ("full"): no [CLS]-free row to give
            if "cls_attention" in self.compressor.requires:
                raise InputError(
                    "tokencomp.apply: [CLS] attention needs vision_feature_select_strategy='default' "
                    "(features without the [CLS] token)."
                )
        return Context(grid=grid, cls_attention=cls, text_embeddings=text)

    def _compress(self, features: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        where = f"each of the {features.shape[0]} image(s) of this batch (LLaVA-1.5 gives every image the same count)"
        check_fits(self.compressor, self.budget, features.shape[1], where)
        start = time.perf_counter()
        result = self.compressor.compress(features, self.budget, self._context(features.shape[1], text))
        self._count(start, features.shape[0] * features.shape[1], result.tokens.shape[0] * result.tokens.shape[1])
        return result.tokens

    def _count(self, start: float, tokens_in: int, tokens_out: int) -> None:
        """Add one compression call (started at ``start``) to the statistics of the pending prefill."""
        self._pending["compress"] = self._pending.get("compress", 0.0) + time.perf_counter() - start
        self._pending["in"] = self._pending.get("in", 0) + tokens_in
        self._pending["out"] = self._pending.get("out", 0) + tokens_out

    def _compress_projector_input(self, module: torch.nn.Module, args: tuple) -> tuple:
        return (self._compress(args[0]),) + tuple(args[1:])

    def _compress_projector_output(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self._compress(output)

    # ------------------------------------------------------------------ language side
    def _before_model(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) == 1 and "input_ids" not in kwargs:
            args, kwargs = (), {"input_ids": args[0], **kwargs}  # LLaVA-NeXT passes input_ids by position
        elif args:
            raise TypeError("tokencomp: call the LLaVA model with keyword arguments (input_ids=..., ...).")
        input_ids = kwargs.get("input_ids")
        token_id = self.model.config.image_token_id
        ids = [token_id] + [v for v in [getattr(self.model.config, "video_token_id", None)] if v is not None]
        visual_ids = torch.tensor(ids, device=input_ids.device) if input_ids is not None else None
        if input_ids is not None and bool(torch.isin(input_ids, visual_ids).any()):
            if self.compressor is not None:
                try:
                    kwargs = self._prefill(module, kwargs, input_ids, token_id)
                except BaseException:
                    self._abandon()
                    raise
            self.visual = torch.isin(kwargs["input_ids"], visual_ids)
            self.mask2d = kwargs.get("attention_mask")
            return args, kwargs
        cache = kwargs.get("cache")
        continuing = cache is not None and input_ids is not None and cache.get_seq_length() > 0
        if not continuing:
            self.visual, self.mask2d, self.state = None, None, None
        elif self.state is not None:
            mask, positions, matched = translate_decode(
                self.state, kwargs.get("attention_mask"), kwargs.get("position_ids"),
                cache.get_seq_length(), input_ids.shape[1],
            )
            if matched:
                kwargs["attention_mask"], kwargs["position_ids"] = mask, positions
        return args, kwargs

    def _abandon(self) -> None:
        """After a failed prefill: switch the vision tower back if it was made eager, and drop what the
        prefill had counted, so that the next call records only its own tokens."""
        restore = self._pending.get("restore_attn")
        if restore is not None:
            self.inner.vision_tower.config._attn_implementation = restore
        self._pending = {}
        self.state, self.visual, self.mask2d = None, None, None

    def _prefill(self, module: torch.nn.Module, kwargs: dict, input_ids: torch.Tensor, token_id: int) -> dict:
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        kwargs["mm_encoder_outputs"] = encoded
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        if bool((input_ids == token_id).any()):
            keep &= self._compress_images(module, kwargs, encoded, input_ids, token_id)
        video_id = getattr(self.model.config, "video_token_id", None)
        if video_id is not None and bool((input_ids == video_id).any()):
            keep &= self._compress_videos(module, kwargs, encoded, input_ids, video_id)
        state = Shortening.from_keep(keep)
        self.state = state
        pad = self.model.config.text_config.pad_token_id
        kwargs["input_ids"] = state.apply(input_ids, fill=0 if pad is None else pad)
        mask = kwargs.get("attention_mask")
        if mask is None and bool((state.source < 0).any()):
            mask = torch.ones_like(input_ids)  # rows were re-padded: the model needs to know where
        if mask is not None:
            kwargs["attention_mask"] = state.apply(mask, fill=0)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = (
                positions_from_mask(kwargs["attention_mask"]) if mask is not None
                else torch.arange(kwargs["input_ids"].shape[1], device=input_ids.device).expand_as(kwargs["input_ids"])
            )
        self._pending["prefill"] = True
        self._pending.setdefault("start", time.perf_counter())
        return kwargs

    def _compress_images(
        self, module: torch.nn.Module, kwargs: dict, encoded: dict, input_ids: torch.Tensor, token_id: int
    ) -> torch.Tensor:
        """``[B, L]`` bool: the image placeholders kept (every other column True)."""
        if encoded.get("image") is None:
            if kwargs.get("pixel_values") is None:
                raise InputError("tokencomp: the prompt has image tokens but neither pixel_values nor mm_encoder_outputs.")
            encoded["image"] = module.get_image_features(
                pixel_values=kwargs["pixel_values"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"),
                return_dict=True,
            )
        kwargs["pixel_values"] = None
        features = list(encoded["image"].pooler_output)
        if self.packed:
            return self._compress_packed(module, input_ids, token_id, features, encoded)
        if self._late:
            features = self._compress_with_instruction(module, input_ids, token_id, features, encoded)
        kept = features[0].shape[0]
        if any(f.shape[0] != kept for f in features):
            raise InputError("tokencomp: images of one LLaVA batch must keep the same number of features.")
        per_image = int((input_ids == token_id).sum()) // len(features)
        return placeholder_keep(input_ids, token_id, per_image, kept)

    def _frame_tokens(self, module: torch.nn.Module) -> int:
        """Tokens per video frame after the model's own pooling (OneVision: bilinear to ceil(s/2);
        NeXT-Video: its pooler's stride)."""
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        if hasattr(module, "apply_pooling"):
            return math.ceil(side / 2) ** 2
        return (side // self.model.config.spatial_pool_stride) ** 2

    def _compress_videos(
        self, module: torch.nn.Module, kwargs: dict, encoded: dict, input_ids: torch.Tensor, video_id: int
    ) -> torch.Tensor:
        """``[B, L]`` bool: the video placeholders kept; each clip compressed whole (``grid = (T, h, w)``) or
        frame by frame (``video="frame"``); OneVision's trailing newline token stays."""
        if encoded.get("video") is None:
            if kwargs.get("pixel_values_videos") is None:
                raise InputError("tokencomp: the prompt has video tokens but neither pixel_values_videos nor mm_encoder_outputs.")
            encoded["video"] = module.get_video_features(
                pixel_values_videos=kwargs["pixel_values_videos"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True,
            )
        kwargs["pixel_values_videos"] = None
        newline = getattr(module, "image_newline", None) if hasattr(module, "apply_pooling") else None
        per_frame = self._frame_tokens(module)
        side = math.isqrt(per_frame)
        flags, outs = [], []
        for v, video in enumerate(encoded["video"].pooler_output):
            video = video.reshape(-1, video.shape[-1])
            is_newline = _newlines(video, newline)
            tokens = video[~is_newline]
            n, d = tokens.shape
            if n % per_frame:
                raise InputError(f"tokencomp: a video has {n} tokens, not a multiple of {per_frame} per frame.")
            frames = n // per_frame
            if self.video == "frame":
                check_fits(self.compressor, self.budget, per_frame, f"each frame of video {v}", unit="frame")
            else:
                check_fits(self.compressor, self.budget, n, f"video {v}", unit="video clip")
            start = time.perf_counter()
            if self.video == "frame":
                grid = (side, side) if side * side == per_frame else None
                result = self.compressor.compress(tokens.view(frames, per_frame, d), self.budget, Context(grid=grid))
                offsets = (torch.arange(frames, device=video.device) * per_frame)[:, None]
                indices, values = (result.indices + offsets).reshape(-1), result.tokens.reshape(-1, d)
            else:
                grid = (frames, side, side) if side * side == per_frame else None
                result = self.compressor.compress(tokens[None], self.budget, Context(grid=grid))
                indices, values = result.indices[0], result.tokens[0]
            self._count(start, n, values.shape[0])
            keep, out = _splice(video, is_newline, indices, values)
            flags.append(keep)
            outs.append(out)
        output = copy.copy(encoded["video"])  # generate reuses its own outputs on every step
        output.pooler_output = torch.cat(outs)[None]  # one row: the models flatten it before scattering
        encoded["video"] = output
        placeholders = input_ids == video_id
        keep_all = torch.ones_like(placeholders)
        chosen_all = torch.cat(flags).to(input_ids.device)
        if int(placeholders.sum()) != chosen_all.numel():
            raise InputError(
                f"tokencomp: the prompt has {int(placeholders.sum())} video tokens but the videos give {chosen_all.numel()}."
            )
        keep_all[placeholders] = chosen_all
        return keep_all

    def _compress_packed(
        self, module: torch.nn.Module, input_ids: torch.Tensor, token_id: int, features: list, encoded: dict
    ) -> torch.Tensor:
        """LLaVA-NeXT / OneVision: compress each image's packed tokens (base view plus unpadded crops),
        keeping its newline tokens; returns the ``[B, L]`` placeholders kept."""
        newline = getattr(module, "image_newline", None)
        visual = input_ids == token_id
        text = None
        if "text_embeddings" in self.compressor.requires:
            text = instruction_embeddings(module.get_input_embeddings(), input_ids, visual)
        rows = item_rows(visual, [f.shape[0] for f in features])
        flags, packed = [], []
        for i, (feature, row) in enumerate(zip(features, rows)):
            is_newline = _newlines(feature, newline)
            tokens = feature[~is_newline]
            n = tokens.shape[0]
            check_fits(self.compressor, self.budget, n, f"image {i} (batch row {row}; newline tokens not counted)")
            side = math.isqrt(n)
            context = Context(
                grid=(side, side) if side * side == n else None,
                text_embeddings=None if text is None else text[row : row + 1].to(tokens.dtype),
                cls_attention=self._packed_cls(module, len(packed), n) if "cls_attention" in self.compressor.requires else None,
            )
            start = time.perf_counter()
            result = self.compressor.compress(tokens[None], self.budget, context)
            self._count(start, n, result.tokens.shape[1])
            keep, out = _splice(feature, is_newline, result.indices[0], result.tokens[0])
            flags.append(keep)
            packed.append(out)
        output = copy.copy(encoded["image"])  # generate reuses its own outputs on every step
        output.pooler_output = packed
        encoded["image"] = output
        keep_all = torch.ones_like(visual)
        keep_all[visual] = torch.cat(flags).to(visual.device)
        return keep_all

    def _compress_with_instruction(
        self, module: torch.nn.Module, input_ids: torch.Tensor, token_id: int, features: list, encoded: dict
    ) -> list:
        """Compress the projected features of every image against its row's instruction embeddings."""
        visual = input_ids == token_id
        text = instruction_embeddings(module.get_input_embeddings(), input_ids, visual)  # [B, T, D]
        per_image = features[0].shape[0]
        rows = torch.repeat_interleave(torch.arange(input_ids.shape[0], device=input_ids.device), visual.sum(dim=1) // per_image)
        stacked = torch.stack(features)
        tokens = self._compress(stacked, text[rows].to(stacked.dtype))
        output = copy.copy(encoded["image"])  # generate reuses its own outputs on every step
        output.pooler_output = list(tokens)
        encoded["image"] = output
        return list(tokens)

    def _after_model(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not self._pending.pop("prefill", False) or "in" not in self._pending:
            return  # no prefill, or features compressed by an earlier call (generate encodes once)
        self.handle.stats.append(
            {
                "stage": "pre_llm",
                "strategy": self.compressor.display_name(),
                "tokens_in": self._pending.get("in", 0),
                "tokens_out": self._pending.get("out", 0),
                "compress_seconds": self._pending.get("compress", 0.0),
                "prefill_seconds": time.perf_counter() - self._pending["start"],
            }
        )
        self._pending = {}


def _newlines(tokens: torch.Tensor, newline: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N]`` bool: the rows of ``tokens`` that are copies of the model's ``image_newline`` embedding."""
    if newline is None:
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    return (tokens == newline.to(tokens)).all(dim=-1)


def _splice(
    tokens: torch.Tensor, is_newline: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the newline rows and the non-newline rows at ``indices``, those holding ``values`` (merged
    values at the kept slots). Returns the kept mask ``[N]`` and the kept rows."""
    chosen = torch.zeros(int((~is_newline).sum()), dtype=torch.bool, device=tokens.device)
    chosen[indices] = True
    keep = is_newline.clone()
    keep[~is_newline] = chosen
    out = tokens[keep].clone()
    out[~is_newline[keep]] = values.to(out.dtype)
    return keep, out


class LlavaNextIntegration(LlavaIntegration):
    """LLaVA-NeXT and LLaVA-OneVision: compression after the any-res packing (base view, unpadded crops,
    newline tokens), per image; the newline tokens always stay and are not counted in the budget, the
    strategy sees the image's other tokens (``grid`` when they form a square)."""

    points = ("post_pack",)
