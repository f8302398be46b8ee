"""Data: image/mask pairs, the torch dataset, and the joint transforms."""

from __future__ import annotations

import os

from ..errors import CadsamError
from .dataset import SegmentationDataset, collate
from .pairs import LAYOUTS, Pair, layout_pairs, pair_folders, scan_pairs, split_validation


def find_pairs(
    images: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    skip_bad: bool = False,
    mask_suffix: str | None = None,
) -> list[Pair]:
    """Pairs from ``--images/--masks`` or from ``--dataset/--data-root`` (one split).
    ``skip_bad`` skips (and reports) unpaired files instead of stopping; ``mask_suffix``
    pairs ``00.png`` with ``00_mask.png`` (see :func:`pair_folders`)."""
    if dataset is not None:
        if images is not None or masks is not None:
            raise CadsamError("give either --images/--masks or --dataset/--data-root, not both")
        if data_root is None:
            raise CadsamError("--dataset needs --data-root")
        return layout_pairs(dataset, data_root, split, skip_bad=skip_bad, mask_suffix=mask_suffix)
    if images is None or masks is None:
        raise CadsamError("give --images DIR --masks DIR, or --dataset LAYOUT --data-root DIR")
    return pair_folders(images, masks, skip_bad=skip_bad, mask_suffix=mask_suffix)


__all__ = [
    "LAYOUTS",
    "Pair",
    "SegmentationDataset",
    "collate",
    "find_pairs",
    "layout_pairs",
    "pair_folders",
    "scan_pairs",
    "split_validation",
]
