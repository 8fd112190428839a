"""Qwen2-VL and Qwen2.5-VL: compress each image's merged visual tokens before the language model.

Where: on the vision tower's output after the patch merger (``point="post_merger"``), one call per image
(images differ in size; the strategy gets the image's ``grid = (h, w)`` of merged tokens) and, for
videos, one call per clip (``video="clip"``, ``grid = (t, h, w)``, the budget per clip) or one batched
call over its frames (``video="frame"``, the budget per temporal patch). The kept
tokens keep their **original 3-D M-RoPE positions** (temporal, height, width): their placeholders stay at
their positions in the prompt, the others leave it, and the position ids handed to the language model
are the original ones gathered at the kept positions. ``generate`` then continues from the right
positions: its own 3-D position ids keep counting in the original layout, and the model's
``rope_deltas`` are raised by the number of tokens removed from each row, so a plain ``forward`` with a
cache continues correctly too.

In-LLM stages run in Qwen's decoder as in LLaVA's (:mod:`tokencomp.integrations.decoder`), with one
difference: the kept tokens always keep their 3-D M-RoPE positions (a strategy that asks to renumber,
ApET's stage 2, keeps them too, since renumbering a 3-D layout has no single meaning).

Qwen3-VL: its DeepStack features (from intermediate vision layers, added to the visual positions of the
first decoder layers) are cut with the same selection; a merged output token gets the mean of the
DeepStack features of the inputs it stands for; in-LLM stages must come after the DeepStack layers.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Optional

import torch

from tokencomp.errors import InputError

from ..base import Compressor
from ..types import Context
from .budget import check_fits
from .decoder import DecoderStages, Stage
from .handle import Handle
from .sequence import Shortening, instruction_embeddings, item_rows, positions_from_mask, translate_decode

POINTS = ("post_merger",)
SUPPLIED = ("grid", "text_embeddings")


class QwenVLIntegration:
    """Hooks that run a pre-LLM ``compressor`` on Qwen2(.5)-VL image tokens, keeping their M-RoPE positions."""

    points = POINTS

    def __init__(
        self, model: Any, compressor: Optional[Compressor], budget: Optional[int | float], stages: list[Stage],
        point: str, allow_eager_fallback: bool, handle: Handle, video: str = "clip",
    ) -> None:
        missing = [f for f in (compressor.requires if compressor is not None else ()) if f not in SUPPLIED]
        if missing:
            raise InputError(
                f"tokencomp.apply: strategy {compressor.display_name()!r} needs context {', '.join(missing)}, which the "
                f"Qwen-VL integration does not supply (it supplies {', '.join(SUPPLIED)}; Qwen's vision tower has no "
                "[CLS] token)."
            )
        self.model, self.compressor, self.budget = model, compressor, budget
        self.video = video
        self.handle = handle
        self.inner = model.model
        self.state: Optional[Shortening] = None
        self.visual: Optional[torch.Tensor] = None
        self.mask2d: Optional[torch.Tensor] = None
        self._pending: Optional[dict[str, Any]] = None
        deep = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])
        early = [st for st in stages if st.layer < deep]
        if early:
            raise InputError(
                f"tokencomp.apply: {type(model).__name__} adds DeepStack visual features in decoder layers 0..{deep - 1}; "
                f"an in-LLM stage at layer {early[0].layer} would cut before them. Use a layer >= {deep}."
            )
        self.decoder = (
            DecoderStages(self.inner.language_model, stages, allow_eager_fallback, handle,
                          visual_mask=lambda: self.visual, key_mask=lambda: self.mask2d, renumber=False)
            if stages else None
        )
        self._grids: list[torch.Tensor] = []  # grid_thw of the vision tower's recent calls

    def _record_grid(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            self._grids = (self._grids + [grid])[-4:]

    def _recorded_grid(self, tokens: int, merge: int) -> torch.Tensor:
        """The ``grid_thw`` the vision tower was called with for these ``tokens`` (when ``generate`` encoded first)."""
        for grid in reversed(self._grids):
            if int((grid.prod(dim=-1) // merge**2).sum()) == tokens:
                return grid
        raise InputError("tokencomp: Qwen-VL visual tokens need their grid_thw (returned by the processor).")

    def install(self) -> None:
        for hook in (
            self.inner.visual.register_forward_pre_hook(self._record_grid, with_kwargs=True),
            self.inner.register_forward_pre_hook(self._before_model, with_kwargs=True),
            self.inner.register_forward_hook(self._after_model),
        ):
            self.handle.on_remove(hook.remove)
        if self.decoder is not None:
            self.decoder.install()
        saved = self.inner.rope_deltas
        self.handle.on_remove(lambda: setattr(self.inner, "rope_deltas", saved))

    # ------------------------------------------------------------------ the language side
    def _before_model(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            raise TypeError("tokencomp: call the Qwen-VL model with keyword arguments (input_ids=..., ...).")
        input_ids = kwargs.get("input_ids")
        visual_ids = torch.tensor([self.model.config.image_token_id, self.model.config.video_token_id])
        if input_ids is not None and bool(torch.isin(input_ids, visual_ids.to(input_ids.device)).any()):
            if self.compressor is not None:
                kwargs = self._prefill(module, kwargs, input_ids)
            self.visual = torch.isin(kwargs["input_ids"], visual_ids.to(input_ids.device))
            self.mask2d = kwargs.get("attention_mask")
            return args, kwargs
        cache = kwargs.get("cache")
        if cache is None or input_ids is None or cache.get_seq_length() == 0:
            self.state, self.visual, self.mask2d = None, None, None
            return args, kwargs
        if self.state is None:
            return args, kwargs
        mask, _, matched = translate_decode(
            self.state, kwargs.get("attention_mask"), None, cache.get_seq_length(), input_ids.shape[1]
        )
        if matched:
            kwargs["attention_mask"] = mask
            positions = kwargs.get("position_ids")
            if positions is not None and positions.dim() == 3 and positions.shape[0] == 4:
                # generate's row 0 counts text positions in the original layout; rows 1-3 are M-RoPE
                shift = self.state.removed.to(positions.device).view(1, -1, 1)
                kwargs["position_ids"] = torch.cat([positions[:1] - shift, positions[1:]], dim=0)
        return args, kwargs

    def _modalities(self, module: torch.nn.Module, kwargs: dict, input_ids: torch.Tensor) -> list[tuple]:
        """``(name, placeholder mask, features, grid_thw)`` for the images and videos the prompt holds."""
        config, merge = self.model.config, module.visual.spatial_merge_size
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})  # generate keeps its own dict for later steps
        kwargs["mm_encoder_outputs"] = encoded
        found = []
        for name, token_id, pixels, grid_key, encode in (
            ("image", config.image_token_id, "pixel_values", "image_grid_thw", module.get_image_features),
            ("video", config.video_token_id, "pixel_values_videos", "video_grid_thw", module.get_video_features),
        ):
            placeholders = input_ids == token_id
            if not bool(placeholders.any()):
                continue
            if encoded.get(name) is None:
                if kwargs.get(pixels) is None or kwargs.get(grid_key) is None:
                    raise InputError(
                        f"tokencomp: the prompt has {name} tokens but no {pixels} with {grid_key}, nor mm_encoder_outputs."
                    )
                encoded[name] = encode(kwargs[pixels], kwargs[grid_key], return_dict=True)
            kwargs[pixels] = None
            features = list(encoded[name].pooler_output)
            grid = kwargs.get(grid_key)
            grid = grid if grid is not None else self._recorded_grid(sum(f.shape[0] for f in features), merge)
            found.append((name, placeholders, features, grid))
        return found

    def _compress_item(
        self, feature: torch.Tensor, thw: list[int], merge: int, video: bool, text: Optional[torch.Tensor],
        where: str = "an image",
    ) -> tuple:
        """Compress one image or video (``where``, for messages); ``(kept tokens [K, D], kept flags [N], seconds)``."""
        t, h, w = thw[0], thw[1] // merge, thw[2] // merge
        if video and self.video == "frame":
            check_fits(self.compressor, self.budget, h * w, f"each frame of {where}", unit="frame")
        else:
            check_fits(self.compressor, self.budget, feature.shape[0], where, unit="video clip" if video else "image")
        tick = time.perf_counter()
        if video and self.video == "frame":
            frames = feature.view(t, h * w, -1)  # one call, the frames as a batch
            texts = None if text is None else text.expand(t, *text.shape)
            result = self.compressor.compress(frames, self.budget, Context(grid=(h, w), text_embeddings=texts))
            offsets = (torch.arange(t, device=feature.device) * h * w)[:, None]
            indices, tokens = (result.indices + offsets).reshape(-1), result.tokens.reshape(-1, feature.shape[-1])
            kept = result.indices.shape[1]
            slot_offsets = (torch.arange(t, device=feature.device) * kept)[:, None]
            assignment = torch.where(result.assignment >= 0, result.assignment + slot_offsets, -1).reshape(-1)
        else:
            grid = (t, h, w) if t > 1 else (h, w)
            result = self.compressor.compress(feature, self.budget, Context(grid=grid, text_embeddings=text))
            indices, tokens, assignment = result.indices, result.tokens, result.assignment
        flags = torch.zeros(feature.shape[0], dtype=torch.bool, device=feature.device)
        flags[indices] = True
        return tokens, flags, time.perf_counter() - tick, assignment

    def _prefill(self, module: torch.nn.Module, kwargs: dict, input_ids: torch.Tensor) -> dict:
        start = time.perf_counter()
        merge = module.visual.spatial_merge_size
        # Step 1: compress each image and each video (clip or frame by frame); note the survivors.
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        grids: dict[str, torch.Tensor] = {}
        seconds, tokens_in, tokens_out = 0.0, 0, 0
        modalities = self._modalities(module, kwargs, input_ids)
        text = None
        if "text_embeddings" in self.compressor.requires:
            visual = torch.stack([m[1] for m in modalities]).any(dim=0)
            text = instruction_embeddings(module.get_input_embeddings(), input_ids, visual)  # [B, T, D]
        for name, placeholders, features, grid in modalities:
            kept_tokens, flags, assignments = [], [], []
            # the row each item sits in: the row of its first placeholder (items run row by row)
            rows = item_rows(placeholders, [f.shape[0] for f in features])
            for i, (feature, thw, row) in enumerate(zip(features, grid.tolist(), rows)):
                item_text = None if text is None else text[row].to(feature.dtype)
                tokens, chosen, spent, assignment = self._compress_item(
                    feature, thw, merge, name == "video", item_text, where=f"{name} {i} (batch row {row})"
                )
                kept_tokens.append(tokens)
                flags.append(chosen)
                assignments.append(assignment)
                seconds += spent
            chosen = torch.cat(flags).to(input_ids.device)
            if int(placeholders.sum()) != chosen.numel():
                raise InputError(
                    f"tokencomp: the prompt has {int(placeholders.sum())} {name} tokens but the {name}s give "
                    f"{chosen.numel()} features."
                )
            # Step 2: the placeholders that stay (they run in the order of the items, row by row).
            keep[placeholders] = chosen
            output = copy.copy(kwargs["mm_encoder_outputs"][name])  # generate reuses its outputs on every step
            output.pooler_output = tuple(kept_tokens)
            if getattr(output, "deepstack_features", None) is not None:
                # Qwen3-VL: each output token's DeepStack features are the mean over the inputs it stands for
                output.deepstack_features = [
                    tuple(_group_mean(f, a, k.shape[0]) for f, a, k in zip(layer, assignments, kept_tokens))
                    for layer in output.deepstack_features
                ]
            kwargs["mm_encoder_outputs"][name] = output
            grids[name] = grid
            tokens_in += chosen.numel()
            tokens_out += int(chosen.sum())
        state = Shortening.from_keep(keep)
        # Step 3: original M-RoPE positions at the kept places; the text row renumbered.
        positions = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if positions is None or positions.dim() != 3:
            rope, deltas = module.get_rope_index(
                input_ids, image_grid_thw=grids.get("image"), video_grid_thw=grids.get("video"),
                attention_mask=mask, mm_token_type_ids=kwargs.get("mm_token_type_ids"),
            )
        else:
            rope, deltas = positions[-3:], module.rope_deltas
        if mask is None:
            mask = torch.ones_like(input_ids)
        short_mask = state.apply(mask, fill=0)
        rope_kept = torch.stack([state.apply(r, fill=1) for r in rope])
        kwargs["position_ids"] = torch.cat([positions_from_mask(short_mask)[None].to(rope_kept.dtype), rope_kept], dim=0)
        module.rope_deltas = deltas + state.removed.view(-1, 1).to(deltas.device)
        # Step 4: the shorter prompt.
        self.state = state
        pad = self.model.config.text_config.pad_token_id
        kwargs["input_ids"] = state.apply(input_ids, fill=0 if pad is None else pad)
        kwargs["attention_mask"] = short_mask
        if kwargs.get("mm_token_type_ids") is not None:
            kwargs["mm_token_type_ids"] = state.apply(kwargs["mm_token_type_ids"], fill=0)
        self._pending = {
            "stage": "pre_llm",
            "strategy": self.compressor.display_name(),
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "compress_seconds": seconds,
            "start": start,
        }
        return kwargs

    def _after_model(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending["prefill_seconds"] = time.perf_counter() - pending.pop("start")
            self.handle.stats.append(pending)


def _group_mean(features: torch.Tensor, assignment: torch.Tensor, slots: int) -> torch.Tensor:
    """``[slots, D]``: the mean of the ``features`` rows assigned to each slot (``-1`` rows ignored)."""
    valid = assignment >= 0
    sums = torch.zeros(slots, features.shape[-1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, assignment[valid], features[valid].float())
    counts = torch.zeros(slots, dtype=torch.float32, device=features.device)
    counts.index_add_(0, assignment[valid], torch.ones(int(valid.sum()), device=features.device))
    return (sums / counts.clamp_min(1)[:, None]).to(features.dtype)
