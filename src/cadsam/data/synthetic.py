"""A small synthetic binary-segmentation set with exact masks, for the demo and tests.

Two kinds of image, the paper's two tasks in miniature:

* camouflage: an object whose texture is the background's, turned to another orientation,
  so it differs only in its high-frequency content;
* shadow: a soft dark region over a textured background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random ellipse (sometimes two, overlapping) covering 5-30 % of the image."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        a, b = rng.uniform(0.12, 0.28, 2)
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        mask |= (u / a) ** 2 + (v / b) ** 2 <= 1
    return mask


def _stripes(size: int, angle: float, period: float, phase: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)


def _noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: random values on a coarse grid, upsampled bicubically."""
    coarse = rng.uniform(0, 255, (max(2, size // scale), max(2, size // scale))).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    return smooth.astype(np.float64) / 127.5 - 1


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    base = rng.uniform(60, 190, 3)
    return base, rng.uniform(20, 50) * rng.choice([-1, 1], 3)


def camouflage_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    mask = _blob(rng, size)
    angle, period, phase = rng.uniform(0, np.pi), rng.uniform(4, 9), rng.uniform(0, 2 * np.pi)
    turn = rng.uniform(np.pi / 4, np.pi / 2)
    pattern = np.where(
        mask, _stripes(size, angle + turn, period, phase), _stripes(size, angle, period, phase)
    )
    pattern = 0.7 * pattern + 0.3 * _noise(rng, size, 8)
    base, contrast = _palette(rng)
    image = base + pattern[..., None] * contrast
    return np.clip(image, 0, 255).astype(np.uint8), mask


def shadow_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    mask = _blob(rng, size)
    soft = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(size / 40))
    shade = np.asarray(soft).astype(np.float64) / 255
    base, contrast = _palette(rng)
    texture = 0.6 * _noise(rng, size, 16) + 0.4 * _noise(rng, size, 4)
    image = (base + texture[..., None] * contrast) * (1 - rng.uniform(0.35, 0.6) * shade[..., None])
    return np.clip(image, 0, 255).astype(np.uint8), shade > 0.5


def make_synthetic_set(
    root: str | Path, n_train: int, n_test: int, size: int = 128, seed: int = 0
) -> Path:
    """Write ``train`` and ``test`` splits (``images/``, ``masks/``, half of each kind) under
    ``root``; returns ``root``. The same seed gives the same files."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            sample = camouflage_sample if i % 2 == 0 else shadow_sample
            image, mask = sample(rng, size)
            name = f"{'camo' if i % 2 == 0 else 'shadow'}_{i:03d}.png"
            Image.fromarray(image).save(root / split / "images" / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / split / "masks" / name)
    return root
