"""What the reports draw: matplotlib when it is installed, and grids of example masks."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from .data import Pair, SegmentationDataset


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


def save_grid(rows: list[np.ndarray], path: Path) -> None:
    """Stack rows (padded to the widest) into one PNG."""
    if not rows:
        return
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def _grey(mask: np.ndarray) -> np.ndarray:
    return np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)
