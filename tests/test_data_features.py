"""Bundled real images and the visual tokens made from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokencomp.analysis.data import BUNDLED_IMAGES, bundled_images, load_image_folder, to_rgb
from tokencomp.analysis.features import EfficientNetTokens, pixel_patches, square_image


def test_bundled_images_load_offline_as_rgb():
    images = bundled_images()
    assert [n for n, _ in images] == list(BUNDLED_IMAGES) and len(images) >= 20
    for name, img in images:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert img.std() > 0, name


def test_to_rgb_conversions():
    assert to_rgb(np.zeros((2, 3), dtype=bool)).shape == (2, 3, 3)
    assert to_rgb(np.array([[0.0, 0.5], [1.0, 1.0]]))[0, 1, 0] == 128
    assert to_rgb(np.zeros((2, 2, 4), dtype=np.uint8)).shape == (2, 2, 3)
    with pytest.raises(ValueError, match=r"expected an image of shape"):
        to_rgb(np.zeros((2, 2, 2, 2)))


def test_pixel_patches_are_the_image_patches():
    img = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    tokens = pixel_patches([img], image_size=28, patch=14)
    assert tokens.shape == (1, 4, 3 * 14 * 14)
    x = square_image(img, 28)  # same size: identity resize
    torch.testing.assert_close(x, torch.from_numpy(img).permute(2, 0, 1).float() / 255, atol=1e-6, rtol=0)
    bottom_left = x[:, 14:, :14].reshape(-1)
    torch.testing.assert_close(tokens[0, 2], bottom_left)


def test_pixel_patches_default_is_576_tokens():
    _, img = bundled_images(["coffee"])[0]
    assert pixel_patches([img]).shape == (1, 576, 588)


def test_efficientnet_is_the_real_pretrained_network():
    _, cat = bundled_images(["chelsea"])[0]
    ext = EfficientNetTokens(image_size=224)
    tokens = ext([cat])
    assert tokens.shape == (1, 49, 1280)
    logits = ext.head(tokens.mean(1))
    assert int(logits.argmax()) in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert EfficientNetTokens(image_size=768).grid == (24, 24)


def test_image_folder(tmp_path):
    Image.fromarray(np.full((10, 12, 3), 7, dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((10, 12), 9, dtype=np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_image_folder(tmp_path)
    assert [n for n, _ in images] == ["a.png", "b.jpg"]
    assert images[1][1].shape == (10, 12, 3)
    (tmp_path / "c.png").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
