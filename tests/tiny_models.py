"""Tiny random-weight vision-language models built from their config classes (milliseconds on CPU).

The default initialisation (std 0.02) makes greedy generation repeat one token whatever the image;
the weight matrices are re-drawn with std 0.2 so that outputs depend on the image.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tokencomp.analysis.tiny_vlm import spread_weights, tiny_llava, tiny_text_config  # noqa: F401  (shared)


def llava_prompt(model, images: int = 1, batch: int = 1, seed: int = 0, pad: list[int] | None = None):
    """``input_ids``, ``attention_mask`` and ``pixel_values`` for ``batch`` rows of ``images`` images each.

    ``pad[b]`` left-pads row ``b`` with that many pad tokens.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    rows = []
    for _ in range(batch):
        row = [1] + torch.randint(2, 100, (3,), generator=g).tolist()
        for _ in range(images):
            row += [cfg.image_token_id] * n + torch.randint(2, 100, (2,), generator=g).tolist()
        row += torch.randint(2, 100, (3,), generator=g).tolist()
        rows.append(row)
    pad = pad or [0] * batch
    length = max(len(r) + p for r, p in zip(rows, pad))
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, (r, _) in enumerate(zip(rows, pad)):
        start = length - len(r)
        ids[b, start:] = torch.tensor(r)
        mask[b, start:] = 1
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch * images, 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def tiny_dinov2_llava(attn_implementation: str = "sdpa", vision_feature_layer: int = -1):
    """A random-weight LLaVA-1.5 layout with a DINOv2 tower (mini-llava's): 84 px, 6 x 6 patches, [CLS] first,
    LayerScale, attention modules at ``encoder.layer[i].attention``; features without [CLS]."""
    from transformers import Dinov2Config

    vision = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=84, patch_size=14)
    return tiny_llava(attn_implementation, vision=vision, vision_feature_layer=vision_feature_layer)


def save_tiny_llava_checkpoint(folder) -> None:
    """A tiny LLaVA and a working processor (word-level tokenizer, CLIP image processor) saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 119)])}
    vocab["<image>"] = 119
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    tiny_llava().save_pretrained(folder)
    processor.save_pretrained(folder)


def tiny_qwen2_vl(attn_implementation: str = "sdpa", version: str = "2"):
    """Qwen2-VL (``version="2.5"``: Qwen2.5-VL, ``"3"``: Qwen3-VL with DeepStack) layout: 2x2 merger, M-RoPE
    decoder; 14 px patches (16 px for Qwen3-VL)."""
    text = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if version == "3":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
        text = dict(text, head_dim=16)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        config = Qwen3VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=151,
            video_token_id=152,
            vision_start_token_id=150,
            vision_end_token_id=153,
        )
        torch.manual_seed(0)
        return spread_weights(
            Qwen3VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
        )
    if version == "2.5":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
    config = Config(
        vision_config=vision,
        text_config=text,
        image_token_id=151,
        video_token_id=152,
        vision_start_token_id=150,
        vision_end_token_id=153,
    )
    torch.manual_seed(0)
    return spread_weights(Model._from_config(config, attn_implementation=attn_implementation))


def qwen_prompt(
    sizes: list[tuple[int, ...]], batch: int = 1, seed: int = 0, pad: list[int] | None = None, patch: int = 14
):
    """Inputs for rows that each hold images ``(h, w)`` or videos ``(t, h, w)`` (14 px patches, even h, w)."""
    g = torch.Generator().manual_seed(seed)
    rows, grids, pixels, video_grids, video_pixels = [], [], [], [], []
    for _ in range(batch):
        row = [1] + torch.randint(3, 100, (3,), generator=g).tolist()
        for size in sizes:
            t, h, w = size if len(size) == 3 else (1, *size)
            token = 152 if len(size) == 3 else 151
            row += [150] + [token] * (t * h * w // 4) + [153] + torch.randint(3, 100, (2,), generator=g).tolist()
            (video_grids if len(size) == 3 else grids).append([t, h, w])
            (video_pixels if len(size) == 3 else pixels).append(
                torch.randn(t * h * w, 3 * 2 * patch * patch, generator=g)
            )
        rows.append(row + torch.randint(3, 100, (3,), generator=g).tolist())
    pad = pad or [0] * batch
    length = max(len(r) + p for r, p in zip(rows, pad))
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = torch.tensor(r)
        mask[b, length - len(r) :] = 1
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == 151).int() + 2 * (ids == 152).int()}
    if grids:
        out.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
    if video_grids:
        out.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(video_grids))
    return out


@contextmanager
def pre_hooks(*pairs):
    """Forward pre-hooks ``fn(module, args, kwargs)`` on the ``(module, fn)`` pairs while the block runs."""
    handles = [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def first_layer_lengths(model, run) -> list[int]:
    """Sequence lengths the first decoder layer sees while ``run()`` runs (no grad)."""
    seen = []

    def spy(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    with pre_hooks((model.model.language_model.layers[0], spy)), torch.no_grad():
        run()
    return seen


def left_pad_batch(rows: list[dict], pad_id: int = 0) -> dict:
    """Stack single-row prompts of different lengths into one left-padded batch (images concatenated)."""
    length = max(r["input_ids"].shape[1] for r in rows)
    out: dict = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key not in rows[0]:
            continue
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.cat([torch.nn.functional.pad(r[key], (length - r[key].shape[1], 0), value=fill) for r in rows])
    for key in ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in rows[0]:
            out[key] = torch.cat([r[key] for r in rows])
    return out


def tiny_llava_next(attn_implementation: str = "sdpa", onevision: bool = False, video: bool = False):
    """LLaVA-NeXT (OneVision, or NeXT-Video) layout: 56 px crops of 4 x 4 patches, any-res pinpoints,
    newline token; video frames pooled to 2 x 2 tokens."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    text = tiny_text_config()
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    if onevision:
        from transformers import LlavaOnevisionConfig as Config
        from transformers import LlavaOnevisionForConditionalGeneration as Model

        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
        config = Config(
            vision_config=vision,
            text_config=text,
            image_token_id=119,
            video_token_id=118,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    else:
        if video:
            from transformers import LlavaNextVideoConfig as Config
            from transformers import LlavaNextVideoForConditionalGeneration as Model

            extra = {"video_token_id": 118, "spatial_pool_stride": 2}
        else:
            from transformers import LlavaNextConfig as Config
            from transformers import LlavaNextForConditionalGeneration as Model

            extra = {}
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        )
        config = Config(
            vision_config=vision,
            text_config=text,
            image_token_id=119,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            **extra,
        )
    torch.manual_seed(0)
    return spread_weights(Model._from_config(config, attn_implementation=attn_implementation))


def llava_next_prompt(model, sizes: list[tuple[int, int]], seed: int = 0, crops: int | None = None):
    """One row with an image of each original ``(height, width)`` in ``sizes``; placeholder counts from the model."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    patches = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
    most = crops or max(patches)
    pixels = torch.randn(len(sizes), most, 3, 56, 56, generator=g)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        lengths = [
            f.shape[0]
            for f in model.model.get_image_features(
                pixel_values=pixels, image_sizes=image_sizes, return_dict=True
            ).pooler_output
        ]
    row = [1] + torch.randint(2, 100, (3,), generator=g).tolist()
    for length in lengths:
        row += [cfg.image_token_id] * length + torch.randint(2, 100, (2,), generator=g).tolist()
    row += torch.randint(2, 100, (3,), generator=g).tolist()
    ids = torch.tensor([row])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_sizes": image_sizes,
    }


def llava_video_prompt(model, frames: int = 4, seed: int = 0, image: tuple[int, int] | None = None):
    """One row with a video of ``frames`` frames (and optionally an image before it); counts from the model."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    video = torch.randn(1, frames, 3, 56, 56, generator=g)
    with torch.no_grad():
        video_len = model.model.get_video_features(pixel_values_videos=video, return_dict=True).pooler_output
    video_len = video_len.reshape(-1, video_len.shape[-1]).shape[0]
    row = [1] + torch.randint(2, 100, (3,), generator=g).tolist()
    out = {}
    if image is not None:
        inputs = llava_next_prompt(model, [image], seed=seed)
        length = int((inputs["input_ids"] == cfg.image_token_id).sum())
        row += [cfg.image_token_id] * length + torch.randint(2, 100, (2,), generator=g).tolist()
        out.update(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    row += [cfg.video_token_id] * video_len + torch.randint(2, 100, (4,), generator=g).tolist()
    ids = torch.tensor([row])
    out.update(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=video)
    return out
