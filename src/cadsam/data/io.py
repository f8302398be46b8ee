"""Reading images and masks as people have them: any mode, any bit depth, EXIF-rotated."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import CadsamError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise CadsamError(f"{what} not found: {path}") from None
    except Exception as exc:  # Pillow raises many types for corrupt or foreign files
        raise CadsamError(f"cannot read {what} {path}: {exc}") from None


def _to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float single-channel image -> uint8 by its type's full range."""
    array = np.asarray(image).astype(np.float64)
    top = (
        1.0
        if image.mode == "F" and array.max() <= 1.0
        else (255.0 if array.max() <= 255 else 65535.0)
    )
    return np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Any image file -> H x W x 3 uint8 RGB (greyscale repeated, alpha dropped, EXIF applied)."""
    return rgb_array(_open(path, "image"))


def rgb_array(image: Image.Image) -> np.ndarray:
    """A Pillow image of any mode -> H x W x 3 uint8 RGB, as :func:`read_image` reads files."""
    if image.mode in WIDE_MODES:
        grey = _to_uint8(image)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


def read_mask(path: str | os.PathLike, threshold: int = 127) -> np.ndarray:
    """Any mask file -> H x W bool. 8-bit values above ``threshold`` are foreground (so lossy
    JPEG masks work); palette masks count any non-zero index; wider types are scaled to 8 bits
    first."""
    image = _open(path, "mask")
    if image.mode == "P":
        return np.array(image) > 0
    if image.mode in WIDE_MODES:
        return _to_uint8(image) > threshold
    return np.array(image.convert("L")) > threshold


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) as read, after EXIF orientation."""
    return read_image(path).shape[:2]


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CadsamError(f"not a folder: {folder}")
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
