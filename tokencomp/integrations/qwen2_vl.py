"""Qwen2-VL and Qwen2.5-VL: compress each image's merged visual tokens before the language model.

Where: on the vision tower's output after the patch merger (``point="post_merger"``), one call per image
(images differ in size; the strategy gets the image's ``grid = (h, w)`` of merged tokens) and, for
videos, one call per clip (``video="clip"``, ``grid = (t, h, w)``, the budget per clip) or one batched
call over its frames (``video="frame"``, the budget per temporal patch). The kept
tokens keep their **original 3-D M-RoPE positions** (temporal, height, width): as many placeholders as
tokens are kept stay in the prompt, the tokens fill them in the strategy's order (position order, or
its authors' order for a strategy whose ``output_order`` is ``"strategy"``, e.g. VisionZip's dominant
tokens first), and each token's position ids are those of its own original position. ``generate``
then continues from the right positions: its own 3-D position ids keep counting in the original
layout, and the model's ``rope_deltas`` are raised by the number of tokens removed from each row, so a
plain ``forward`` with a cache continues correctly too.

In-LLM stages run in Qwen's decoder as in LLaVA's (:mod:`tokencomp.integrations.decoder`), with one
difference: the kept tokens always keep their 3-D M-RoPE positions (a strategy that asks to renumber,
ApET's stage 2, SparseVLM or PyramidDrop, keeps them too, since renumbering a 3-D layout has no single
meaning).

Qwen3-VL: its DeepStack features (from intermediate vision layers, added to the visual positions of the
first decoder layers) are cut with the same selection; a merged output token gets the mean of the
DeepStack features of the inputs it stands for; in-LLM stages must come after the DeepStack layers.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch

from tokencomp.errors import InputError

from .base import Integration, check_supplied
from .decoder import Stage
from .sequence import Shortening, instruction_embeddings, item_rows, positions_from_mask, translate_decode


class QwenVLIntegration(Integration):
    """Hooks that run a pre-LLM ``compressor`` on Qwen2(.5)-VL image tokens, keeping their M-RoPE positions."""

    points: ClassVar[tuple[str, ...]] = ("post_merger",)
    supplied = ("grid", "text_embeddings")
    family = "Qwen-VL"
    renumber = False  # M-RoPE: kept tokens always keep their positions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._grids: list[torch.Tensor] = []  # grid_thw of the vision tower's recent calls

    # ------------------------------------------------------------------ checks and hooks
    def check_context(self) -> None:
        check_supplied(
            self._compressor, self.supplied, "Qwen-VL integration", note="; Qwen's vision tower has no [CLS] token"
        )

    def check_stages(self, stages: list[Stage]) -> None:
        """In-LLM stages must come after Qwen3-VL's DeepStack layers."""
        deep = len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or [])
        early = [st for st in stages if st.layer < deep]
        if early:
            raise InputError(
                f"tokencomp.apply: {type(self.model).__name__} adds DeepStack visual features in decoder layers "
                f"0..{deep - 1}; an in-LLM stage at layer {early[0].layer} would cut before them. "
                f"Use a layer >= {deep}."
            )

    def vision_hooks(self) -> list[Any]:
        return [self.inner.visual.register_forward_pre_hook(self._record_grid, with_kwargs=True)]

    def install(self) -> None:
        super().install()
        saved = self.inner.rope_deltas
        self.handle.on_remove(lambda: setattr(self.inner, "rope_deltas", saved))

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

    # ------------------------------------------------------------------ decoding
    def decode_step(self, kwargs: dict, past: int, new: int) -> dict:
        """The mask translated; generate's text row of the 3-D positions shifted (rows 1-3 are M-RoPE)."""
        assert self.state is not None  # _before_model translates only after a shortened prefill
        mask, _, matched = translate_decode(self.state, kwargs.get("attention_mask"), None, past, new)
        if matched:
            kwargs["attention_mask"] = mask
            positions = kwargs.get("position_ids")
            if positions is not None and positions.dim() == 3 and positions.shape[0] == 4:
                # generate's row 0 counts text positions in the original layout; rows 1-3 are M-RoPE
                shift = self.state.removed.to(positions.device).view(1, -1, 1)
                kwargs["position_ids"] = torch.cat([positions[:1] - shift, positions[1:]], dim=0)
        return kwargs

    # ------------------------------------------------------------------ the prefill
    def _modalities(self, module: Any, kwargs: dict, input_ids: torch.Tensor) -> list[tuple]:
        """``(name, placeholder mask, features, grid_thw)`` for the images and videos the prompt holds."""
        config, merge = self.model.config, module.visual.spatial_merge_size
        self.own_outputs(kwargs)
        found = []
        for name, token_id, pixels, grid_key, encode in (
            ("image", config.image_token_id, "pixel_values", "image_grid_thw", module.get_image_features),
            ("video", config.video_token_id, "pixel_values_videos", "video_grid_thw", module.get_video_features),
        ):
            placeholders = input_ids == token_id
            if not bool(placeholders.any()):
                continue
            features = self.encoded(
                kwargs,
                name,
                (pixels, grid_key),
                functools.partial(encode, kwargs.get(pixels), kwargs.get(grid_key), return_dict=True),
            )
            grid = kwargs.get(grid_key)
            grid = grid if grid is not None else self._recorded_grid(sum(f.shape[0] for f in features), merge)
            found.append((name, placeholders, features, grid))
        return found

    def _compress_modality(
        self,
        kwargs: dict,
        name: str,
        placeholders: torch.Tensor,
        features: list,
        grid: torch.Tensor,
        merge: int,
        text: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress each image or video of one modality.

        Returns the ``[N_total]`` placeholders kept and, for each kept placeholder in prompt order, the
        placeholder (``0 .. N_total - 1``) whose original M-RoPE position its token carries: the kept
        tokens fill the kept placeholders in the strategy's order (``output_order``), each keeping its
        own position.
        """
        kept_tokens, flags, assignments, sources = [], [], [], []
        offset = 0
        # the row each item sits in: the row of its first placeholder (items run row by row)
        rows = item_rows(placeholders, [f.shape[0] for f in features])
        for i, (feature, thw, row) in enumerate(zip(features, grid.tolist(), rows)):
            t, h, w = thw[0], thw[1] // merge, thw[2] // merge
            indices, tokens, assignment = self.compress_item(
                feature,
                t,
                (h, w),
                (t, h, w) if t > 1 else (h, w),
                f"{name} {i} (batch row {row})",
                unit="video clip" if name == "video" else "image",
                text=None if text is None else text[row].to(feature.dtype),
            )
            chosen = torch.zeros(feature.shape[0], dtype=torch.bool, device=feature.device)
            chosen[indices] = True
            kept_tokens.append(tokens)
            flags.append(chosen)
            assignments.append(assignment)
            sources.append(indices + offset)
            offset += feature.shape[0]
        chosen = torch.cat(flags).to(placeholders.device)
        if int(placeholders.sum()) != chosen.numel():
            raise InputError(
                f"tokencomp: the prompt has {int(placeholders.sum())} {name} tokens but the {name}s give "
                f"{chosen.numel()} features."
            )
        fields: dict[str, Any] = {"pooler_output": tuple(kept_tokens)}
        deepstack = getattr(kwargs["mm_encoder_outputs"][name], "deepstack_features", None)
        if deepstack is not None:
            # Qwen3-VL: each output token's DeepStack features are the mean over the inputs it stands for
            fields["deepstack_features"] = [
                tuple(_group_mean(f, a, k.shape[0]) for f, a, k in zip(layer, assignments, kept_tokens))
                for layer in deepstack
            ]
        self.replace_output(kwargs, name, **fields)
        return chosen, torch.cat(sources).to(placeholders.device)

    def prefill(self, module: Any, kwargs: dict, input_ids: torch.Tensor) -> dict:
        merge = module.visual.spatial_merge_size
        # Step 1: compress each image and each video (clip or frame by frame); note the survivors and,
        # for each, the column whose M-RoPE position its token carries.
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        source = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).clone()
        grids: dict[str, torch.Tensor] = {}
        modalities = self._modalities(module, kwargs, input_ids)
        text = None
        if "text_embeddings" in self._compressor.requires:
            visual = torch.stack([m[1] for m in modalities]).any(dim=0)
            text = instruction_embeddings(module.get_input_embeddings(), input_ids, visual)  # [B, T, D]
        for name, placeholders, features, grid in modalities:
            # Step 2: the placeholders that stay (they run in the order of the items, row by row).
            chosen, sources = self._compress_modality(kwargs, name, placeholders, features, grid, merge, text)
            keep[placeholders] = chosen
            where = placeholders.nonzero()  # [N_total, 2] (row, column), in the order of the items
            kept_at = where[chosen]
            source[kept_at[:, 0], kept_at[:, 1]] = where[sources, 1]
            grids[name] = grid
        state = Shortening.from_keep(keep)
        # Step 3: each kept token's original M-RoPE positions; the text row renumbered.
        positions = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if positions is None or positions.dim() != 3:
            rope, deltas = module.get_rope_index(
                input_ids,
                image_grid_thw=grids.get("image"),
                video_grid_thw=grids.get("video"),
                attention_mask=mask,
                mm_token_type_ids=kwargs.get("mm_token_type_ids"),
            )
        else:
            rope, deltas = positions[-3:], module.rope_deltas
        if mask is None:
            mask = torch.ones_like(input_ids)
        short_mask = state.apply(mask, fill=0)
        rope = rope.gather(-1, source.to(rope.device).expand_as(rope))
        rope_kept = torch.stack([state.apply(r, fill=1) for r in rope])
        text_row = positions_from_mask(short_mask)[None].to(rope_kept.dtype)
        kwargs["position_ids"] = torch.cat([text_row, rope_kept], dim=0)
        module.rope_deltas = deltas + state.removed.view(-1, 1).to(deltas.device)
        # Step 4: the shorter prompt.
        self.shorten_ids(state, kwargs, input_ids)
        kwargs["attention_mask"] = short_mask
        if kwargs.get("mm_token_type_ids") is not None:
            kwargs["mm_token_type_ids"] = state.apply(kwargs["mm_token_type_ids"], fill=0)
        return kwargs


def _group_mean(features: torch.Tensor, assignment: torch.Tensor, slots: int) -> torch.Tensor:
    """``[slots, D]``: the mean of the ``features`` rows assigned to each slot (``-1`` rows ignored)."""
    valid = assignment >= 0
    sums = torch.zeros(slots, features.shape[-1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, assignment[valid], features[valid].float())
    counts = torch.zeros(slots, dtype=torch.float32, device=features.device)
    counts.index_add_(0, assignment[valid], torch.ones(int(valid.sum()), device=features.device))
    return (sums / counts.clamp_min(1)[:, None]).to(features.dtype)
