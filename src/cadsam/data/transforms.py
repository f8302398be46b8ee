"""Joint image/mask transforms: the paper's resize and augmentation, in numpy and Pillow.

Train: resize to ``size`` x ``size``, then with probability 0.5 one of horizontal flip,
vertical flip, rot90 (k = 1, 2 or 3) or shift-scale-rotate (shift <= 6.25 %, scale 0.9-1.1,
rotation <= 45 degrees, zero border), chosen uniformly. Test: resize only. The image is resized
bilinearly, the mask by nearest neighbour so it stays binary.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

AUGMENTATIONS = ("hflip", "vflip", "rot90", "shift_scale_rotate")
# The fixed transforms an embedding cache can hold, one embedding each.
VIEWS = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """H x W x 3 uint8 -> size x size, bilinear: how every image reaches the model."""
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.array(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    return resize_image(image, size), mask


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.array(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def augment_pair(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, p: float = 0.5, fill: int = 0
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Apply one randomly chosen augmentation to both with probability ``p``; returns its name.
    ``fill``: the mask's value where a shift or rotation uncovers the border (a label map's
    ignore value; the binary task's background)."""
    if rng.random() >= p:
        return image, mask, None
    name = AUGMENTATIONS[rng.integers(len(AUGMENTATIONS))]
    if name == "hflip":
        image, mask = image[:, ::-1], mask[:, ::-1]
    elif name == "vflip":
        image, mask = image[::-1], mask[::-1]
    elif name == "rot90":
        k = int(rng.integers(1, 4))
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    else:
        height, width = mask.shape
        matrix = _shift_scale_rotate_matrix(
            width,
            height,
            shift=rng.uniform(-0.0625, 0.0625, size=2),
            scale=rng.uniform(0.9, 1.1),
            angle=rng.uniform(-45, 45),
        )
        image = np.array(
            Image.fromarray(np.ascontiguousarray(image)).transform(
                (width, height), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR
            )
        )
        mask = np.array(
            Image.fromarray(np.ascontiguousarray(mask)).transform(
                (width, height),
                Image.Transform.AFFINE,
                matrix,
                Image.Resampling.NEAREST,
                fillcolor=fill if mask.dtype != bool else bool(fill),
            )
        )
    return np.ascontiguousarray(image), np.ascontiguousarray(mask), name


def _shift_scale_rotate_matrix(
    width: int, height: int, shift: np.ndarray, scale: float, angle: float
) -> tuple[float, ...]:
    """PIL's AFFINE takes the output -> input map: invert 'rotate and scale about the centre,
    then shift by a fraction of the size'."""
    cx, cy = width / 2, height / 2
    theta = math.radians(angle)
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    tx, ty = shift[0] * width, shift[1] * height
    # input = R^-1 (output - centre - t) + centre, with R^-1 = [[cos, sin], [-sin, cos]] / scale
    ox, oy = cx + tx, cy + ty
    return (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)


def apply_view(array: np.ndarray, view: str) -> np.ndarray:
    """A view of an H x W (x C) array: the same transform for image and mask."""
    if view == "identity":
        return array
    if view == "hflip":
        return np.ascontiguousarray(array[:, ::-1])
    if view == "vflip":
        return np.ascontiguousarray(array[::-1])
    k = {"rot90": 1, "rot180": 2, "rot270": 3}[view]
    return np.ascontiguousarray(np.rot90(array, k))
