"""Bundled real images and the visual tokens made from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokencomp.analysis.data import BUNDLED_IMAGES, bundled_images, load_image_folder, read_image, to_rgb
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


def test_wide_images_keep_their_values(tmp_path):
    """16-bit and float images are scaled to 8 bits from their full scale, not clipped by PIL first."""
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    got = read_image(tmp_path / "wide.png")
    assert got.shape == (16, 16, 3) and np.array_equal(got[..., 0], (ramp // 257).astype(np.uint8))
    unit = (np.arange(64, dtype=np.float32) / 63).reshape(8, 8)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    assert np.array_equal(read_image(tmp_path / "unit.tif")[..., 1], (unit * 255).round().astype(np.uint8))
    Image.fromarray(unit * 2, mode="F").save(tmp_path / "over.tif")
    with pytest.raises(ValueError, match=r"values in \[0, 2\]; allowed: \[0, 1\]"):
        read_image(tmp_path / "over.tif")


def test_images_are_read_upright_and_writable(tmp_path):
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[0, 0] = 255  # a marked corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(image).save(tmp_path / "turned.png", exif=exif)
    got = read_image(tmp_path / "turned.png")
    assert got.shape == (6, 4, 3) and got[0, -1].tolist() == [255, 255, 255]
    assert got.flags.writeable  # no "NumPy array is not writable" warning downstream


def test_a_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is then over twice the limit
    with pytest.raises(ValueError, match="cannot read image .*big.png.*decompression bomb"):
        read_image(tmp_path / "big.png")
