"""The torch dataset over image/mask pairs."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import read_image, read_mask
from .pairs import Pair
from .transforms import augment_pair, resize_mask, resize_pair


class SegmentationDataset(Dataset):
    """Items: ``image`` (3 x S x S uint8), ``mask`` (1 x S x S float 0/1), ``index``; with
    ``keep_original`` also ``original_mask`` (H x W bool, the ground truth as read).

    Augmentation randomness comes from (seed, epoch, index) alone, so it is the same whatever
    the worker, rank or resume point: call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        pairs: list[Pair],
        size: int = 512,
        augment: bool = False,
        mask_threshold: int = 127,
        resize_masks: bool = False,
        keep_original: bool = False,
        seed: int = 0,
    ) -> None:
        self.pairs = pairs
        self.size = size
        self.augment = augment
        self.mask_threshold = mask_threshold
        self.resize_masks = resize_masks
        self.keep_original = keep_original
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        image = read_image(pair.image)
        original = read_mask(pair.mask, self.mask_threshold)
        if original.shape != image.shape[:2]:
            assert self.resize_masks, (
                "scan_pairs lets mismatched sizes through only with resize_masks"
            )
            original = resize_mask(original, *image.shape[:2])
        image, mask = resize_pair(image, original, self.size)
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, mask, _ = augment_pair(image, mask, rng)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).float()[None],
            "index": index,
        }
        if self.keep_original:
            item["original_mask"] = torch.from_numpy(original)
        return item


def collate(items: list[dict]) -> dict:
    """Stack fixed-size fields; keep original masks (of varying sizes) as a list."""
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }
    if "original_mask" in items[0]:
        batch["original_mask"] = [it["original_mask"] for it in items]
    return batch
