"""SAM's input geometry: resize the longest side (as PIL does it) and map prompts alike."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size after scaling so the longest side is ``long_side``, rounded as SAM rounds."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """H x W x 3 uint8 -> uint8 with its longest side ``long_side`` (PIL bilinear)."""
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def apply_coords(
    coords: np.ndarray | torch.Tensor, original_size: tuple[int, int], long_side: int
) -> np.ndarray | torch.Tensor:
    """(x, y) pixel coordinates in the original image -> the resized image's frame."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    scale = [new_w / old_w, new_h / old_h]
    if isinstance(coords, torch.Tensor):
        return coords.float() * coords.new_tensor(scale, dtype=torch.float32)
    return coords.astype(float) * np.array(scale)


def apply_boxes(
    boxes: np.ndarray | torch.Tensor, original_size: tuple[int, int], long_side: int
) -> np.ndarray | torch.Tensor:
    """N x 4 boxes (x0, y0, x1, y1) in the original image -> the resized image's frame."""
    corners = apply_coords(boxes.reshape(-1, 2, 2), original_size, long_side)
    return corners.reshape(-1, 4)
