"""The torch dataset over image/mask pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .coco import coco_instances
from .io import read_image
from .labels import IGNORE, ClassTable
from .pairs import Pair, read_target
from .prompts import PromptSettings, class_objects, draw_prompts
from .transforms import apply_view, augment_pair, resize_mask, resize_pair

PROMPTS = ("boxes", "points", "labels")  # draw_prompts' arrays the model takes
PROMPT_KEYS = (*(f"prompt_{k}" for k in PROMPTS), "object_masks")


class SegmentationDataset(Dataset):
    """Items: ``image`` (3 x S x S uint8), ``mask`` (1 x S x S float 0/1; with ``classes``,
    S x S int64 class indices, IGNORE where ignored), ``index``, ``id`` (the pair's, to name it
    where training stops on it); with ``keep_original`` also ``original_mask`` (H x W, the
    ground truth as read).

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
        cache: tuple[str, list[str], list[int]] | None = None,
        classes: ClassTable | None = None,
        coco_category: str | None = None,
        channels: tuple[int, ...] | None = None,
        prompts: PromptSettings | None = None,
        every_object: bool = False,
    ) -> None:
        """``cache``: (cache folder, its views, each pair's row in it). Items then carry the
        cached ``embedding`` of a view, and augmentation is a choice among the cached views.
        ``prompts`` (boxes or points): items also carry each prompted object's prompt and mask
        (:func:`~cadsam.data.prompts.draw_prompts`: ``prompt_boxes``, ``prompt_points``,
        ``prompt_labels``, ``object_masks``), ``per_image`` of them, or with ``every_object``
        each object once."""
        self.pairs = pairs
        self.size = size
        self.augment = augment
        self.mask_threshold = mask_threshold
        self.resize_masks = resize_masks
        self.keep_original = keep_original
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.classes = classes
        self.coco_category = coco_category  # masks in COCO JSON, binary: the category
        self.channels = channels  # multi-channel images: those read (None: the first three)
        self.prompts = prompts if prompts is not None and prompts.prompted else None
        self.every_object = every_object
        self._embeddings: np.ndarray | None = None  # opened lazily, in each worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        image = read_image(pair.image, self.channels)
        original = self._ground_truth(pair)
        if original.shape != image.shape[:2]:
            assert self.resize_masks, (
                "scan_pairs lets mismatched sizes through only with resize_masks"
            )
            original = resize_mask(original, *image.shape[:2])
        image, mask = resize_pair(image, original, self.size)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        embedding = None
        if self.cache is not None:
            view = self._cached_view(rng)
            image, mask = apply_view(image, view), apply_view(mask, view)
            embedding = self._embedding(index, view)
        elif self.augment:
            image, mask, _ = augment_pair(image, mask, rng, fill=IGNORE if self.classes else 0)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "mask": self._target(mask),
            "index": index,
            "id": pair.id,
        }
        if self.prompts is not None:
            item |= self._prompted(mask, rng)
        if self.keep_original:
            item["original_mask"] = torch.from_numpy(original)
        if embedding is not None:
            item["embedding"] = embedding
        return item

    def _prompted(self, mask: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The prompted objects' prompts and targets. Binary: each object's mask (float 0/1).
        K classes: each object's S x S target, its class on it, IGNORE where the label map
        ignores, and ``classes.count`` (no class) elsewhere."""
        if self.classes is None:
            instances = None if mask.dtype == bool else mask  # COCO's instances, or components
            drawn = draw_prompts(mask > 0, self.prompts, rng, self.every_object, instances)
            target = torch.from_numpy(drawn["masks"]).float()
        else:
            instances, object_class = class_objects(mask, self.classes.count)
            drawn = draw_prompts(instances > 0, self.prompts, rng, self.every_object, instances)
            kinds = object_class[drawn["ids"]][:, None, None]
            outside = np.where(mask == IGNORE, IGNORE, self.classes.count)
            target = torch.from_numpy(np.where(drawn["masks"], kinds, outside[None]))
        prompts = {f"prompt_{k}": torch.from_numpy(v) for k, v in drawn.items() if k in PROMPTS}
        return prompts | {"object_masks": target}

    def _ground_truth(self, pair: Pair) -> np.ndarray:
        """The pair's mask as read; for prompts on COCO instances, their map (0: none, k: the
        k-th instance), so that each instance is prompted, not each connected component."""
        coco = pair.mask.suffix.lower() == ".json"
        if self.prompts is not None and coco and self.classes is None:
            return coco_instances(pair.mask, pair.id, self.coco_category)
        return read_target(pair, self.classes, self.mask_threshold, self.coco_category)

    def _target(self, mask: np.ndarray) -> torch.Tensor:
        if self.classes is None:  # a bool mask, or a map of COCO's instances: foreground > 0
            return torch.from_numpy(np.ascontiguousarray(mask > 0)).float()[None]
        return torch.from_numpy(mask.astype(np.int64))

    def _cached_view(self, rng: np.random.Generator) -> str:
        """Like the paper's augmentation, but among cached views: identity half the time."""
        others = [v for v in self.cache[1] if v != "identity"]
        if not self.augment or not others or rng.random() >= 0.5:
            return "identity"
        return others[rng.integers(len(others))]

    def _embedding(self, index: int, view: str) -> torch.Tensor:
        root, views, rows = self.cache
        if self._embeddings is None:
            self._embeddings = np.load(Path(root) / "embeddings.npy", mmap_mode="r")
        entry = rows[index] * len(views) + views.index(view)
        return torch.from_numpy(np.array(self._embeddings[entry], dtype=np.float32))


def collate(items: list[dict]) -> dict:
    """Stack fixed-size fields; keep original masks (of varying sizes) as a list."""
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "id": [it["id"] for it in items],
    }
    if "original_mask" in items[0]:
        batch["original_mask"] = [it["original_mask"] for it in items]
    if "embedding" in items[0]:
        batch["embedding"] = torch.stack([it["embedding"] for it in items])
    for key in PROMPT_KEYS:  # as many objects per image in training; any number in evaluation
        if key in items[0]:
            values = [it[key] for it in items]
            same = all(v.shape == values[0].shape for v in values)
            batch[key] = torch.stack(values) if same else values
    return batch
