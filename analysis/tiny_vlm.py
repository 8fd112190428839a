"""Tiny random-weight vision-language models built from their config classes (milliseconds on CPU).

They have the real architectures (a CLIP vision tower with a [CLS] token, a projector, a Llama decoder
with rotary positions and a KV cache), so every integration path runs as it does in a real checkpoint;
their weights are random, so what they answer means nothing. The default initialisation (std 0.02)
makes greedy generation repeat one token whatever the image; :func:`spread_weights` re-draws the weight
matrices with std 0.2 so that outputs depend on the image.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["spread_weights", "tiny_llava", "tiny_text_config"]


def spread_weights(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight matrix of ``model`` from ``N(0, std^2)`` (seeded); returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_text_config(layers: int = 4) -> Any:
    """The tiny Llama decoder of every tiny VLM here: width 64, 4 heads / 2 KV heads, vocabulary 120."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
        max_position_embeddings=2048,
        pad_token_id=0,
    )


def tiny_llava(
    attn_implementation: str = "sdpa",
    image_size: int = 84,
    layers: int = 4,
    vision_layers: int = 3,
    vision: Any = None,
    vision_feature_layer: int = -2,
):
    """A random-weight LLaVA-1.5 layout: CLIP tower, features of layer -2 without [CLS], Llama decoder.

    Parameters
    ----------
    attn_implementation : str
        ``"sdpa"`` (the transformers default) or ``"eager"``.
    image_size : int
        Side of the input image; the tower's patches are 14 px, so 336 gives LLaVA-1.5's 576 tokens.
    layers : int
        Decoder layers (LLaVA-1.5-7B has 32, which in-LLM strategies' default layers assume).
    vision_layers : int
        Vision-tower layers.
    vision : transformers.PretrainedConfig, optional
        Another tower's configuration instead of the tiny CLIP one (``image_size`` and ``vision_layers``
        then do not apply), e.g. a DINOv2 one.
    vision_feature_layer : int
        The tower layer the features come from.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    if vision is None:
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=14,
            projection_dim=32,
        )
    config = LlavaConfig(
        vision_config=vision,
        text_config=tiny_text_config(layers),
        image_token_id=119,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return spread_weights(model)
