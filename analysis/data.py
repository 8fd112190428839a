"""Real images that ship inside PyPI packages, and loading a folder of the user's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokencomp.errors import InputError

__all__ = ["BUNDLED_IMAGES", "bundled_images", "load_image_folder", "read_image", "to_rgb"]

# scikit-image images that load offline (natural photographs, microscopy, astronomy, scans, text).
_SKIMAGE = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
# scikit-image's stereo pair (left view) and scikit-learn's two sample photographs.
BUNDLED_IMAGES = _SKIMAGE + ("motorcycle", "china", "flower")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any 2-D or 3-D image array as ``[H, W, 3]`` uint8."""
    img = np.asarray(image)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = img.astype(np.float64)
        lo, hi = float(img.min()), float(img.max())
        img = np.zeros_like(img) if hi <= lo else (img - lo) / (hi - lo)
        img = (img * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise InputError(f"expected an image of shape [H, W], [H, W, 3] or [H, W, 4]; got {img.shape}")
    return np.ascontiguousarray(img[..., :3])


def _load_bundled(name: str) -> np.ndarray:
    if name == "motorcycle":
        import skimage.data

        return skimage.data.stereo_motorcycle()[0]
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    return getattr(skimage.data, name)()


def bundled_images(names: tuple[str, ...] | list[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """The bundled real images as ``(name, [H, W, 3] uint8)``, in a fixed order.

    Parameters
    ----------
    names : sequence of str, optional
        A subset of :data:`BUNDLED_IMAGES` (default: all of them).
    """
    names = BUNDLED_IMAGES if names is None else tuple(names)
    unknown = [n for n in names if n not in BUNDLED_IMAGES]
    if unknown:
        raise InputError(f"unknown bundled image(s) {unknown}; available: {', '.join(BUNDLED_IMAGES)}")
    return [(name, to_rgb(_load_bundled(name))) for name in names]


def load_image_folder(folder: str | Path) -> list[tuple[str, np.ndarray]]:
    """Every image file in ``folder`` (sorted by name) as ``(file name, [H, W, 3] uint8)``.

    Raises
    ------
    ValueError
        If the folder does not exist, holds no image, or an image file cannot be decoded.
    """
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"image folder {str(path)!r} does not exist or is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"image folder {str(path)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return [(file.name, read_image(file)) for file in files]


#: PIL modes of more than 8 bits per sample, and the full-scale value each is read against.
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def read_image(file: str | Path) -> np.ndarray:
    """One image file as ``[H, W, 3]`` uint8, upright (its EXIF orientation applied).

    16-bit and 32-bit integer images are read against the 16-bit full scale (65535) and float images
    against 1.0, before any conversion to 8 bits; a value outside that range is an error (a 10-bit image
    stored in 16 bits reads dark: rescale it to the full range first).

    Raises
    ------
    tokencomp.errors.InputError
        The file cannot be decoded, is a decompression bomb, or holds values outside its full scale.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(file) as opened:
            im = ImageOps.exif_transpose(opened)
            if im.mode not in _WIDE_MODES:
                return np.array(im.convert("RGB"))
            values = np.array(im, dtype=np.float64)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {str(file)!r}: {exc}") from exc
    full = _WIDE_MODES[im.mode]
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 or hi > full:
        raise InputError(
            f"image {str(file)!r} (PIL mode {im.mode}) has values in [{lo:g}, {hi:g}]; allowed: [0, {full:g}] "
            "(the full scale of its type); rescale it into that range, or save it as 8-bit"
        )
    return to_rgb((values / full * 255).round().astype(np.uint8))
