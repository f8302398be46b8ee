"""What the reports draw: matplotlib when it is installed, and grids of example masks."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..data import Pair, SegmentationDataset


def pyplot() -> ModuleType | None:
    """matplotlib's pyplot on a file-only backend, or None without matplotlib (plots are then
    left out; tables never are)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


@torch.no_grad()
def mask_rows(models: list[torch.nn.Module], pairs: list[Pair], size: int) -> list[np.ndarray]:
    """One row per pair: the image, its ground truth, then each model's mask (size x size)."""
    rows = []
    for item in SegmentationDataset(pairs, size):
        row = [item["image"].permute(1, 2, 0).numpy(), _grey(item["mask"][0].numpy() > 0.5)]
        for model in models:
            row.append(_grey((model.eval()(item["image"][None].float())[0, 0] > 0).numpy()))
        rows.append(np.concatenate(row, axis=1))
    return rows


def save_grid(rows: list[np.ndarray], path: Path, columns: list[str] | None = None) -> None:
    """Stack rows (padded to the widest) into one PNG. ``columns``: a label for each column,
    drawn above it (the widest row is split evenly among them)."""
    if not rows:
        return
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    if columns:
        rows.insert(0, column_header(columns, width))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def column_header(labels: list[str], width: int) -> np.ndarray:
    """A white strip ``width`` pixels wide with each label centred over its column, in the
    largest font size (at most 14 px) at which every label fits its column."""
    cell = width // len(labels)
    font = _fitting_font(labels, cell - 4)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), label, font=font) for label in labels]
    height = max(b[3] for b in boxes) + 8
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    for i, (label, box) in enumerate(zip(labels, boxes, strict=True)):
        x = i * cell + max(0, (cell - (box[2] - box[0])) // 2) - box[0]
        draw.text((x, 4), label, fill="black", font=font)
    return np.asarray(strip)


def _fitting_font(labels: list[str], room: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    try:
        for size in range(14, 6, -1):
            font = ImageFont.load_default(size=size)
            if all(probe.textlength(label, font=font) <= room for label in labels):
                return font
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: one bitmap size
        return ImageFont.load_default()
    return font


def _grey(mask: np.ndarray) -> np.ndarray:
    return np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)
