"""Image/mask pairs: from any two folders (paired by file stem) or a named data-set layout.

Every pair is read once when the data set is scanned, before training starts, so a corrupt
file or an image whose mask has another size is reported up front, not mid-epoch.
"""

from __future__ import annotations

import os
import random
import shlex
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..cores import usable_cores
from ..errors import CadsamError
from .coco import coco_images, coco_labels, coco_mask
from .io import (
    GREY_SHARE,
    IMAGE_EXTENSIONS,
    TRANSPOSING,
    TURNED,
    list_images,
    orientation,
    read_image,
    read_mask,
    read_mask_and_grey_share,
    warn,
)
from .labels import ClassTable, read_labels


@dataclass(frozen=True)
class Pair:
    id: str  # the shared file stem
    image: Path
    mask: Path


@dataclass(frozen=True)
class Layout:
    """Where a public data set keeps each split's images and masks, relative to its root."""

    splits: dict[str, tuple[str, str]]
    name_filter: str | None = None  # keep only files whose name contains this
    shared_masks: bool = False  # one mask folder for all splits: extra masks are expected


LAYOUTS: dict[str, Layout] = {
    "istd": Layout(
        {"train": ("train/train_A", "train/train_B"), "test": ("test/test_A", "test/test_B")}
    ),
    "camo": Layout(
        {"train": ("Images/Train", "GT"), "test": ("Images/Test", "GT")}, shared_masks=True
    ),
    "cod10k": Layout(
        {"train": ("Train/Image", "Train/GT_Object"), "test": ("Test/Image", "Test/GT_Object")},
        name_filter="-CAM-",
    ),
    "sinet": Layout(
        {
            "train": ("TrainDataset/Imgs", "TrainDataset/GT"),
            "test": ("TestDataset/COD10K/Imgs", "TestDataset/COD10K/GT"),
            **{
                f"test-{name.lower()}": (f"TestDataset/{name}/Imgs", f"TestDataset/{name}/GT")
                for name in ("CAMO", "COD10K", "CHAMELEON", "NC4K")
            },
        }
    ),
}


def _by_stem(files: list[Path], folder: Path, suffix: str | None = None) -> dict[str, Path]:
    """Files by pair id: the stem, or with ``suffix`` the name (or stem) minus the suffix.
    Files whose name does not end in the suffix are left out."""
    stems: dict[str, Path] = {}
    for path in files:
        stem = _pair_id(path, suffix)
        if stem is None:
            continue
        if stem in stems:
            raise CadsamError(
                f"two files for {stem} in {folder}: {stems[stem].name}, {path.name}"
                if suffix
                else f"two files named {stem} in {folder}: {stems[stem].name}, {path.name}"
            )
        stems[stem] = path
    return stems


def _pair_id(path: Path, suffix: str | None) -> str | None:
    if not suffix:
        return path.stem
    # "_mask" is matched against the stem, "_mask.png" against the whole name
    name = path.name if Path(suffix).suffix.lower() in IMAGE_EXTENSIONS else path.stem
    if not name.endswith(suffix) or name == suffix:
        return None
    return name[: -len(suffix)]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _unpaired(
    images: Path,
    masks: Path,
    no_mask: list[str],
    no_image: list[str],
    unmatched: list[str],
    suffix: str | None,
) -> list[str]:
    """One phrase per kind of file left without a partner."""
    parts = []
    if no_mask:
        parts.append(
            f"{len(no_mask)} image(s) in {images} have no mask in {masks}: {_listing(no_mask)}"
        )
    if no_image:
        parts.append(f"{len(no_image)} mask(s) in {masks} have no image: {_listing(no_image)}")
    if unmatched:
        parts.append(
            f"{len(unmatched)} file(s) in {masks} do not end in --mask-suffix {suffix}: "
            f"{_listing(unmatched)}"
        )
    return parts


def _suggested_suffix(image_ids: set[str], mask_files: list[Path], paired: int) -> str | None:
    """The --mask-suffix that pairs more masks than ``paired``, as ``_mask`` for 00.png and
    00_mask.png: the commonest rest of a mask's stem after an image's stem, else None."""
    found: Counter[str] = Counter()
    for path in mask_files:
        stem = path.stem
        for end in range(len(stem) - 1, 0, -1):  # the longest image stem that starts it
            if stem[:end] in image_ids:
                found[stem[end:]] += 1
                break
    if not found:
        return None
    suffix, count = found.most_common(1)[0]
    return suffix if count > paired else None


def _suffix_fix(suffix: str) -> str:
    """What to pass for masks named <image stem>SUFFIX, as the shell reads it."""
    flag = f"--mask-suffix{'=' if suffix.startswith('-') else ' '}{shlex.quote(suffix)}"
    return f" (the masks are named <image stem>{suffix}: pass {flag})"


def _warn(message: str) -> None:
    warn(message)  # once under torchrun


def pair_folders(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    name_filter: str | None = None,
    extra_masks_ok: bool = False,
    *,
    skip_bad: bool = False,
    mask_suffix: str | None = None,
) -> list[Pair]:
    """Pair the images in one folder with the masks in another by file stem.

    With ``mask_suffix`` (``"_mask"``) a mask's stem minus the suffix is its pair's id, so
    ``00.png`` pairs with ``00_mask.png``. Files without a partner are an error naming them;
    with ``skip_bad`` they are left out and reported on stderr. ``masks`` may be a COCO JSON
    file instead of a folder, each pair's mask then (:func:`~cadsam.data.coco.coco_images`)."""
    images, masks = Path(images), Path(masks)
    if masks.suffix.lower() == ".json" and not masks.is_dir():  # COCO: one file for all
        found = coco_images(images, masks, skip_bad=skip_bad)
        return [Pair(stem, image, masks) for stem, image in found.items()]
    image_files = [p for p in list_images(images) if name_filter is None or name_filter in p.name]
    mask_files = [p for p in list_images(masks) if name_filter is None or name_filter in p.name]
    by_image, by_mask = _by_stem(image_files, images), _by_stem(mask_files, masks, mask_suffix)
    no_mask = sorted(set(by_image) - set(by_mask))
    no_image = [] if extra_masks_ok else sorted(set(by_mask) - set(by_image))
    unmatched = (
        []
        if extra_masks_ok or not mask_suffix
        else sorted(p.name for p in mask_files if _pair_id(p, mask_suffix) is None)
    )
    parts = _unpaired(images, masks, no_mask, no_image, unmatched, mask_suffix)
    stems = sorted(set(by_image) & set(by_mask))
    suffix = _suggested_suffix(set(by_image), mask_files, len(stems)) if parts else None
    fix = _suffix_fix(suffix) if suffix is not None and suffix != mask_suffix else ""
    if parts and not skip_bad:
        # --skip-bad only where it would leave pairs to use
        fix = fix or (" (--skip-bad skips unpaired files)" if stems else "")
        raise CadsamError("; ".join(parts) + fix)
    if not by_image:
        raise CadsamError(
            f"no images found in {images} (looked for {', '.join(('png', 'jpg', 'tif', '...'))})"
        )
    if not stems:
        raise CadsamError(f"no image in {images} has a mask in {masks}: " + "; ".join(parts) + fix)
    if parts:
        _warn("skipped unpaired files: " + "; ".join(parts))
    return [Pair(stem, by_image[stem], by_mask[stem]) for stem in stems]


def layout_pairs(
    layout: str,
    root: str | os.PathLike,
    split: str,
    *,
    skip_bad: bool = False,
    mask_suffix: str | None = None,
) -> list[Pair]:
    """The pairs of one split of a named layout (``istd``, ``camo``, ``cod10k``, ``sinet``)."""
    if layout not in LAYOUTS:
        raise CadsamError(f"unknown --dataset {layout!r}: choose from {', '.join(LAYOUTS)}")
    spec = LAYOUTS[layout]
    if split not in spec.splits:
        raise CadsamError(f"{layout} has no split {split!r}: choose from {', '.join(spec.splits)}")
    image_dir, mask_dir = (Path(root) / part for part in spec.splits[split])
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise CadsamError(
                f"{layout} {split} split: expected folder {folder} (is --data-root right?)"
            )
    return pair_folders(
        image_dir,
        mask_dir,
        spec.name_filter,
        extra_masks_ok=spec.shared_masks,
        skip_bad=skip_bad,
        mask_suffix=mask_suffix,
    )


def split_validation(
    pairs: list[Pair], fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """Hold out ``fraction`` of the pairs (at least one), chosen by ``seed``: (train, val)."""
    if not 0 < fraction < 1:
        raise CadsamError(f"--val-fraction must be between 0 and 1, got {fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(pairs) * fraction))
    val = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in val], [
        p for i, p in enumerate(pairs) if i in val
    ]


UNREADABLE, MISMATCHED, TURNED_APART = "unreadable", "mismatched", "turned apart"
GREY = "grey"  # a mask not drawn in black and white: said, not refused
# what a user can do about each kind of bad pair
PAIR_FIXES = {
    UNREADABLE: "replace or remove the file, or pass --skip-bad to leave the pair out",
    MISMATCHED: "pass --resize-masks to resize each mask to its image, or --skip-bad to leave "
    "the pair out",
    TURNED_APART: "save the image with its turn applied (and no EXIF orientation), or give the "
    "mask the image's EXIF orientation; or pass --skip-bad to leave the pair out",
}
KIND_NAMES = {
    UNREADABLE: "unreadable",
    MISMATCHED: "with a mask of another size",
    TURNED_APART: "whose image and mask EXIF turns differently",
}
LISTED_PROBLEMS = 20  # named one a line in the error; the rest counted


def read_target(
    pair: Pair,
    classes: ClassTable | None,
    mask_threshold: int = 127,
    coco_category: str | None = None,
) -> np.ndarray:
    """A pair's ground truth as read: H x W bool for the binary task, else class indices
    (:func:`~cadsam.data.labels.read_labels`). From COCO JSON: the classes' label map, or for
    the binary task the mask of ``coco_category``."""
    if pair.mask.suffix.lower() == ".json":
        if classes is not None:
            return coco_labels(pair.mask, pair.id, classes)
        if coco_category is None:
            raise CadsamError(
                f"{pair.mask} is COCO JSON: name the category to segment with --coco-category "
                "NAME, or give --classes for a label map of every category"
            )
        return coco_mask(pair.mask, pair.id, coco_category)
    if classes is None:
        return read_mask(pair.mask, mask_threshold)
    return read_labels(pair.mask, classes)


def _check_pair(
    pair: Pair,
    mask_threshold: int,
    resize_masks: bool,
    classes: ClassTable | None,
    coco_category: str | None,
    channels: tuple[int, ...] | None,
) -> tuple[str, str] | None:
    """None if the pair reads and fits, else (its kind of problem, what is wrong)."""
    coco = pair.mask.suffix.lower() == ".json"
    try:
        image = read_image(pair.image, channels)
        if classes is None and not coco:
            mask, grey_share = read_mask_and_grey_share(pair.mask, mask_threshold)
        else:
            mask, grey_share = read_target(pair, classes, coco_category=coco_category), 0.0
    except CadsamError as exc:
        return UNREADABLE, str(exc)
    # COCO's polygons are drawn on the image as shown: there is no mask turn to compare
    turned = None if coco else _turned_apart(pair, image.shape[:2], mask.shape)
    if turned is not None:
        return TURNED_APART, turned
    if image.shape[:2] != mask.shape and not resize_masks:
        return MISMATCHED, (
            f"image {pair.image} is {image.shape[1]}x{image.shape[0]} but mask {pair.mask} is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )
    if grey_share > GREY_SHARE:
        return GREY, f"{pair.mask} ({grey_share:.0%} grey)"
    return None


def _turned_apart(
    pair: Pair, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]
) -> str | None:
    """What is wrong where the image's EXIF orientation and the mask's differ, so that the two
    are turned apart as read, unless their sizes show the mask was drawn on the image as
    shown (a turn by 90 degrees of a non-square image); else None."""
    turns = orientation(pair.image), orientation(pair.mask)
    if turns[0] == turns[1]:
        return None
    square = image_shape[0] == image_shape[1]
    one_transposes = (turns[0] in TRANSPOSING) != (turns[1] in TRANSPOSING)
    if image_shape == mask_shape and one_transposes and not square:
        return None
    return (
        f"image {pair.image} is {_shown_turned(turns[0])} but its mask {pair.mask} is "
        f"{_shown_turned(turns[1])}: which way the mask fits the image cannot be told"
    )


def _shown_turned(turn: int) -> str:
    return f"shown {TURNED[turn]} (EXIF orientation {turn})" if turn in TURNED else "as stored"


def _problems_error(found: list[tuple[str, str]], total: int) -> CadsamError:
    """Every bad pair in one error, under the fix for its kind: one line for one problem, else
    a line that counts them and then one line each (up to LISTED_PROBLEMS)."""
    if len(found) == 1:
        kind, text = found[0]
        return CadsamError(f"{text} ({PAIR_FIXES[kind]})")
    lines = [f"{len(found)} of {total} image/mask pairs cannot be used:"]
    room = LISTED_PROBLEMS
    for kind, fix in PAIR_FIXES.items():
        texts = [text for k, text in found if k == kind]
        if not texts:
            continue
        lines.append(f"  {len(texts)} {KIND_NAMES[kind]} ({fix}):")
        lines += [f"    {text}" for text in texts[:room]]
        if len(texts) > room:
            lines.append(f"    ... and {len(texts) - room} more")
        room = max(0, room - len(texts))
    return CadsamError("\n".join(lines))


def scan_pairs(
    pairs: list[Pair],
    mask_threshold: int = 127,
    resize_masks: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    classes: ClassTable | None = None,
    coco_category: str | None = None,
    channels: tuple[int, ...] | None = None,
) -> tuple[list[Pair], list[str]]:
    """Read every pair once. Returns (good pairs, problems); without ``skip_bad`` any problem
    is an error naming every bad pair, with the fix for each kind. ``classes``: the masks are
    label maps of these classes (a value of none of them is a problem); ``coco_category``: the
    binary task's category in COCO JSON masks; ``channels``: those of the images read."""
    with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        results = list(
            tqdm(
                pool.map(
                    lambda p: _check_pair(
                        p, mask_threshold, resize_masks, classes, coco_category, channels
                    ),
                    pairs,
                ),
                total=len(pairs),
                desc="checking data",
                unit="pair",
                disable=not progress,
                leave=False,
            )
        )
    grey = [r[1] for r in results if r is not None and r[0] == GREY]
    found = [r for r in results if r is not None and r[0] != GREY]
    if found and not skip_bad:
        raise _problems_error(found, len(pairs))
    if grey:
        _warn(
            f"{len(grey)} mask(s) are not black and white (over {GREY_SHARE:.0%} of their pixels "
            f"grey, as noise or a photo is), yet read as foreground above {mask_threshold}: "
            f"{_listing(grey)}"
        )
    problems = [text for _, text in found]
    kept = [p for p, r in zip(pairs, results, strict=True) if r is None or r[0] == GREY]
    return kept, problems
