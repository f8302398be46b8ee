"""Prompts drawn from the ground truth: boxes and points per object, as a user would give them.

The paper prompts SAM with the whole image. A model that is to answer a box or a click after
adaptation trains on them: each object (a connected component of the mask) gets a box, jittered
as MedSAM does, and/or points inside it (and, if asked, outside it), and its own mask is the
target. Every draw comes from a seeded generator, so a run repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import CadsamError

PROMPTS = ("whole", "box", "points", "box+points")
# objects smaller than this share of the image are specks, not objects, unless there is no other
MIN_OBJECT_SHARE = 1e-4
TYPES = {"masks": bool, "ids": np.int64}  # of draw_prompts' arrays; the others float32


# train's names (TrainConfig's, ``--set NAME=VALUE``) of PromptSettings' fields after ``kind``
TRAIN_NAMES = {
    "per_image": "prompts_per_image",
    "points": "prompt_points",
    "negatives": "prompt_negatives",
    "box_jitter": "box_jitter",
}


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are drawn; ``kind`` "whole" is the paper's whole-image box."""

    kind: str = "whole"
    per_image: int = 4  # objects prompted per image (drawn again, with replacement, if fewer)
    points: int = 1  # foreground points per object
    negatives: int = 0  # background points per object, outside it
    box_jitter: float = 0.02  # each box side moves by up to this share of the image size

    def __post_init__(self) -> None:
        if self.kind not in PROMPTS:
            raise CadsamError(f"prompt must be one of {', '.join(PROMPTS)}, not {self.kind!r}")
        if self.per_image < 1:
            raise CadsamError(f"prompts_per_image must be at least 1, not {self.per_image}")
        if self.uses_points and self.points + self.negatives < 1:
            raise CadsamError("prompt_points and prompt_negatives cannot both be 0 for points")
        if min(self.points, self.negatives) < 0 or not 0 <= self.box_jitter < 0.5:
            raise CadsamError("prompt_points, prompt_negatives >= 0; box_jitter in [0, 0.5)")

    @property
    def prompted(self) -> bool:
        return self.kind != "whole"

    @property
    def uses_box(self) -> bool:
        return self.kind in ("box", "box+points")

    @property
    def uses_points(self) -> bool:
        return self.kind in ("points", "box+points")


def objects(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The mask's objects, its 8-connected components (specks left out where others exist):
    a map of them (H x W int) and the ids of those kept. A mask is drawn from, not copied per
    object: a membrane image has hundreds of components."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return labelled, []
    sizes = np.bincount(labelled.ravel())[1:]
    keep = np.flatnonzero(sizes >= MIN_OBJECT_SHARE * mask.size)
    if len(keep) == 0:
        keep = np.array([int(np.argmax(sizes))])
    return labelled, [int(k) + 1 for k in keep]


def class_objects(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A label map's objects, each class's connected components (specks left out as in
    :func:`objects`): a map of them (H x W int, 0 none) and each object's class (indexed by
    the object's id; -1 at id 0). IGNORE's pixels (-1) are no object."""
    found = np.zeros(labels.shape, dtype=np.int64)
    object_class = [-1]
    for k in np.unique(labels[(labels >= 0) & (labels < count)]):
        components, ids = objects(labels == k)
        renumber = np.zeros(components.max() + 1, dtype=np.int64)
        renumber[ids] = np.arange(len(object_class), len(object_class) + len(ids))
        found += renumber[components]
        object_class += [int(k)] * len(ids)
    return found, np.array(object_class, dtype=np.int64)


def draw_prompts(
    mask: np.ndarray,
    settings: PromptSettings,
    rng: np.random.Generator,
    every: bool = False,
    instances: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Prompts for the objects of an H x W bool mask (its connected components, or where
    ``instances`` maps them, 0 none and k the k-th, its instances): ``per_image`` of them drawn
    (``every``: each object once, as evaluation scores them). Returns ``masks`` (N x H x W
    bool, each object's target), ``ids`` (N: each object's id, 0 for none), and as the kind
    asks ``boxes`` (N x 4: x0, y0, x1, y1 in pixels), ``points`` (N x P x 2: x, y) and
    ``labels`` (N x P: 1 inside, 0 outside). An image with no object gets prompts on its
    background and an empty target: nothing there."""
    if instances is None:
        found, ids = objects(mask)
    else:
        found, ids = instances, [int(k) for k in np.unique(instances) if k > 0]
    if every:
        picked = ids
    elif ids:
        picked = [ids[i] for i in rng.integers(len(ids), size=settings.per_image)]
    else:
        picked = []
    chosen = [found == k for k in picked] or [np.zeros_like(mask, dtype=bool)] * (
        1 if every else settings.per_image
    )
    drawn: dict[str, list] = {"masks": chosen, "boxes": [], "points": [], "labels": []}
    drawn["ids"] = picked or [0] * len(chosen)
    for target in chosen:
        if settings.uses_box:
            drawn["boxes"].append(_box(target, settings.box_jitter, rng))
        if settings.uses_points:
            points, labels = _points(target, settings, rng)
            drawn["points"].append(points)
            drawn["labels"].append(labels)
    return {
        key: np.stack(values).astype(TYPES.get(key, np.float32))
        for key, values in drawn.items()
        if values
    }


def _box(target: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """The object's bounding box, each side moved outwards by up to ``jitter`` of the image
    (MedSAM's perturbation); a random box on an empty target."""
    height, width = target.shape
    rows, cols = np.nonzero(target)
    if len(rows) == 0:
        x0, x1 = np.sort(rng.integers(0, width, 2))
        y0, y1 = np.sort(rng.integers(0, height, 2))
    else:
        x0, x1, y0, y1 = cols.min(), cols.max(), rows.min(), rows.max()
    shift = rng.uniform(0, jitter, 4) * np.array([width, height, width, height])
    return np.array(
        [
            max(0.0, x0 - shift[0]),
            max(0.0, y0 - shift[1]),
            min(width - 1.0, x1 + shift[2]),
            min(height - 1.0, y1 + shift[3]),
        ]
    )


def _points(
    target: np.ndarray, settings: PromptSettings, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Points drawn uniformly inside the object (label 1) and outside it (label 0); on an empty
    target every point is outside."""
    inside, outside = np.argwhere(target), np.argwhere(~target)
    wanted_inside = settings.points if len(inside) else 0
    wanted_outside = settings.points + settings.negatives - wanted_inside
    picked = [inside[rng.integers(len(inside), size=wanted_inside)]] if wanted_inside else []
    if wanted_outside:
        picked.append(outside[rng.integers(len(outside), size=wanted_outside)])
    yx = np.concatenate(picked)
    labels = np.array([1.0] * wanted_inside + [0.0] * wanted_outside)
    return yx[:, ::-1].astype(np.float32), labels
