"""LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video: compress after the any-res packing, per image.

Where: on each image's packed tokens (``point="post_pack"``: the base view and the unpadded crops, with
the model's ``image_newline`` tokens), one compression call per image, before the language model. The
newline tokens always stay and are not counted in the budget; the strategy sees the image's other tokens
(``grid`` when they form a square, the instruction's ``text_embeddings``, and the [CLS] attention of
every crop laid out like the packed tokens). Videos (NeXT-Video, OneVision) are compressed per clip
(``video="clip"``, ``grid = (t, h, w)``) or frame by frame (``video="frame"``) on the tokens after the
model's own pooling; OneVision's trailing newline token stays. The kept tokens sit among the newline
tokens in position order, since the newlines end the rows of the token grid (a strategy's own output
order, e.g. VisionZip's dominant tokens first, does not apply to this layout). The prompt is then shortened as for
LLaVA-1.5 (:mod:`tokencomp.integrations.llava`), whose vision side ([CLS] attention, eager fallback)
this integration shares.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import Any, Optional

import torch

from ..errors import InputError
from ..types import Context
from .budget import check_fits
from .llava import LlavaIntegration
from .sequence import instruction_embeddings, item_rows


class LlavaNextIntegration(LlavaIntegration):
    """LLaVA-NeXT and LLaVA-OneVision: compression after the any-res packing (base view, unpadded crops,
    newline tokens), per image; the newline tokens always stay and are not counted in the budget, the
    strategy sees the image's other tokens (``grid`` when they form a square)."""

    points = ("post_pack",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._image_sizes: Optional[torch.Tensor] = None
        self._image_cls: Optional[torch.Tensor] = None
        super().__init__(*args, **kwargs)

    def _check_late(self) -> None:
        """Packed images are always compressed in :meth:`prefill`, where the instruction is known."""

    def feature_hooks(self) -> list[Any]:
        """No projector hooks: the packed tokens are compressed in :meth:`prefill`; [CLS] strategies need
        each encoding's ``image_sizes``."""
        if "cls_attention" in self._compressor.requires:
            self._record_image_sizes()
        return []

    def _record_image_sizes(self) -> None:
        """Remember the ``image_sizes`` of each image encoding (``generate`` encodes the images before the
        forward, without them), to split the per-crop [CLS] rows per image."""
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

    def _packed_cls(self, module: Any, image: int, n: int) -> Optional[torch.Tensor]:
        """Image ``image``'s [CLS] attention laid out like its packed tokens (``[1, n]``, newlines excluded)."""
        if self._image_cls is None:
            return None
        sizes = self._image_sizes
        if sizes is None:
            raise InputError("tokencomp: [CLS] attention on an any-res model needs image_sizes.")
        helper = sys.modules[type(module).__module__].image_size_to_num_patches
        counts = [
            helper(
                image_size=s,
                grid_pinpoints=self.model.config.image_grid_pinpoints,
                patch_size=self.model.config.vision_config.image_size,
            )
            for s in sizes
        ]
        rows = torch.split(self._image_cls, counts)[image]  # [crops, tokens per crop]
        packed, _ = module.pack_image_features(
            [rows[..., None]],
            sizes[image : image + 1],
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            image_newline=None,
        )
        cls = packed[0][:, 0]
        if cls.shape[0] != n:
            raise InputError("tokencomp: the [CLS] rows do not line up with the packed image tokens.")
        return cls[None]

    # ------------------------------------------------------------------ images
    def place_images(
        self, module: Any, kwargs: dict, input_ids: torch.Tensor, token_id: int, features: list
    ) -> torch.Tensor:
        """Compress each image's packed tokens (base view plus unpadded crops), keeping its newline tokens;
        returns the ``[B, L]`` placeholders kept."""
        newline = getattr(module, "image_newline", None)
        visual = input_ids == token_id
        compressor, budget = self._compressor, self._budget
        text = None
        if "text_embeddings" in compressor.requires:
            text = instruction_embeddings(module.get_input_embeddings(), input_ids, visual)
        rows = item_rows(visual, [f.shape[0] for f in features])
        flags: list[torch.Tensor] = []
        packed: list[torch.Tensor] = []
        for i, (feature, row) in enumerate(zip(features, rows)):
            is_newline = _newlines(feature, newline)
            tokens = feature[~is_newline]
            n = tokens.shape[0]
            check_fits(compressor, budget, n, f"image {i} (batch row {row}; newline tokens not counted)")
            side = math.isqrt(n)
            reads_cls = "cls_attention" in compressor.requires
            context = Context(
                grid=(side, side) if side * side == n else None,
                text_embeddings=None if text is None else text[row : row + 1].to(tokens.dtype),
                cls_attention=self._packed_cls(module, len(packed), n) if reads_cls else None,
            )
            start = time.perf_counter()
            result = compressor.compress(tokens[None], budget, context)
            self.stats.count("pre_llm", compressor, start, n, result.tokens.shape[1])
            keep, out = _splice(feature, is_newline, result.indices[0], result.tokens[0])
            flags.append(keep)
            packed.append(out)
        self.replace_output(kwargs, "image", pooler_output=packed)
        keep_all = torch.ones_like(visual)
        keep_all[visual] = torch.cat(flags).to(visual.device)
        return keep_all

    # ------------------------------------------------------------------ videos
    def visual_keep(self, module: Any, kwargs: dict, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: the prompt's columns kept, its images' and its videos'."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        token_id = self.model.config.image_token_id
        if bool((input_ids == token_id).any()):
            keep &= self._compress_images(module, kwargs, input_ids, token_id)
        video_id = getattr(self.model.config, "video_token_id", None)
        if video_id is not None and bool((input_ids == video_id).any()):
            keep &= self._compress_videos(module, kwargs, input_ids, video_id)
        return keep

    def _frame_tokens(self, module: Any) -> int:
        """Tokens per video frame after the model's own pooling (OneVision: bilinear to ceil(s/2);
        NeXT-Video: its pooler's stride)."""
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        if hasattr(module, "apply_pooling"):
            return math.ceil(side / 2) ** 2
        return (side // self.model.config.spatial_pool_stride) ** 2

    def _compress_videos(self, module: Any, kwargs: dict, input_ids: torch.Tensor, video_id: int) -> torch.Tensor:
        """``[B, L]`` bool: the video placeholders kept; each clip compressed whole (``grid = (T, h, w)``) or
        frame by frame (``video="frame"``); OneVision's trailing newline token stays."""
        videos = self.encoded(
            kwargs,
            "video",
            ("pixel_values_videos",),
            lambda: module.get_video_features(
                pixel_values_videos=kwargs["pixel_values_videos"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True,
            ),
        )
        newline = getattr(module, "image_newline", None) if hasattr(module, "apply_pooling") else None
        per_frame = self._frame_tokens(module)
        side = math.isqrt(per_frame)
        square = side * side == per_frame
        flags, outs = [], []
        for v, video in enumerate(videos):
            video = video.reshape(-1, video.shape[-1])
            is_newline = _newlines(video, newline)
            tokens = video[~is_newline]
            if tokens.shape[0] % per_frame:
                raise InputError(
                    f"tokencomp: a video has {tokens.shape[0]} tokens, not a multiple of {per_frame} per frame."
                )
            frames = tokens.shape[0] // per_frame
            indices, values, _ = self.compress_item(
                tokens,
                frames,
                (side, side) if square else None,
                (frames, side, side) if square else None,
                f"video {v}",
                unit="video clip",
            )
            keep, out = _splice(video, is_newline, indices, values)
            flags.append(keep)
            outs.append(out)
        self.replace_output(kwargs, "video", pooler_output=torch.cat(outs)[None])  # one row: the models flatten it
        placeholders = input_ids == video_id
        keep_all = torch.ones_like(placeholders)
        chosen_all = torch.cat(flags).to(input_ids.device)
        if int(placeholders.sum()) != chosen_all.numel():
            raise InputError(
                f"tokencomp: the prompt has {int(placeholders.sum())} video tokens but the videos give "
                f"{chosen_all.numel()}."
            )
        keep_all[placeholders] = chosen_all
        return keep_all


def _newlines(tokens: torch.Tensor, newline: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N]`` bool: the rows of ``tokens`` that are copies of the model's ``image_newline`` embedding."""
    if newline is None:
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    return (tokens == newline.to(tokens)).all(dim=-1)


def _splice(
    tokens: torch.Tensor, is_newline: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the newline rows and the non-newline rows at ``indices``, those holding ``values`` (merged
    values at the kept slots). Returns the kept mask ``[N]`` and the kept rows.

    The packed layout's newline rows end the rows of the token grid, so the kept tokens sit there in
    position order, whatever order the strategy returns them in (``output_order``)."""
    chosen = torch.zeros(int((~is_newline).sum()), dtype=torch.bool, device=tokens.device)
    chosen[indices] = True
    keep = is_newline.clone()
    keep[~is_newline] = chosen
    out = tokens[keep].clone()
    out[~is_newline[keep]] = values[indices.argsort()].to(out.dtype)
    return keep, out
