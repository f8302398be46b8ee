"""COCO JSON annotations as label maps: one JSON file for a folder of images.

Polygons and RLE (compressed or not) are rasterised by pycocotools (the ``cadsam[labels]``
extra). Each JSON file is parsed once per process and shared by every image it describes.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CadsamError
from .io import LABELS_EXTRA, list_images, warn
from .labels import IGNORE, ClassTable

PARSED_FILES = 4  # COCO files kept parsed at once (a train and a val file, with room)
LISTED = 8  # names listed in an error; the rest counted
_PARSING = threading.Lock()  # the pair scan's threads wait for one parse, not parse each


@dataclass(frozen=True)
class _Coco:
    path: Path
    coco: Any  # pycocotools.coco.COCO
    by_stem: dict[str, dict]  # image entries by the stem of their file name
    categories: dict[int, str]  # category id -> name


def coco_images(
    images: str | os.PathLike, annotations: str | os.PathLike, *, skip_bad: bool = False
) -> dict[str, Path]:
    """The images in a folder that have an entry in a COCO file, by stem (the stem of a
    ``file_name``'s last part, so ``train/00.jpg`` pairs with ``00.png``), in stem order.
    Images without an entry, and entries without an image, are an error naming them; with
    ``skip_bad`` they are left out and reported."""
    images, annotations = Path(images), Path(annotations)
    parsed = _parsed(annotations)
    files: dict[str, Path] = {}
    for path in list_images(images):
        if path.stem in files:
            raise CadsamError(
                f"two files named {path.stem} in {images}: {files[path.stem].name}, {path.name}"
            )
        files[path.stem] = path
    if not files:
        raise CadsamError(f"no images found in {images}")
    no_entry = sorted(set(files) - set(parsed.by_stem))
    no_file = sorted(set(parsed.by_stem) - set(files))
    parts = []
    if no_entry:
        parts.append(
            f"{len(no_entry)} image(s) in {images} have no entry in {annotations}: "
            f"{_listing(no_entry)}"
        )
    if no_file:
        parts.append(
            f"{len(no_file)} image(s) of {annotations} are not in {images}: {_listing(no_file)}"
        )
    stems = sorted(set(files) & set(parsed.by_stem))
    if not stems:
        raise CadsamError(
            f"no image in {images} has an entry in {annotations}: " + "; ".join(parts)
        )
    if parts and not skip_bad:
        raise CadsamError("; ".join(parts) + " (--skip-bad leaves them out)")
    if parts:
        warn("skipped unpaired images: " + "; ".join(parts))
    return {stem: files[stem] for stem in stems}


def coco_image_size(annotations: str | os.PathLike, image_stem: str) -> tuple[int, int]:
    """(height, width) that the COCO file gives the image: its label map's shape."""
    entry = _entry(_parsed(Path(annotations)), image_stem)
    return int(entry["height"]), int(entry["width"])


def coco_labels(annotations: str | os.PathLike, image_stem: str, table: ClassTable) -> np.ndarray:
    """One image's annotations -> H x W int32 class indices (H x W from the COCO entry).

    A category is the table's class of the same name (one not in the table is an error).
    Unannotated pixels are class 0 where the table's first class is named ``background``
    (in any case), else :data:`IGNORE`. Crowd (``iscrowd``) regions are painted
    :data:`IGNORE` first; then the other annotations in the order of their ``id``, so where
    two overlap the later (larger ``id``) wins, and an object drawn over a crowd keeps its
    class."""
    parsed = _parsed(Path(annotations))
    entry = _entry(parsed, image_stem)
    by_name = {name: index for index, name in enumerate(table.names)}
    fill = 0 if table.names[0].lower() == "background" else IGNORE
    labels = np.full((int(entry["height"]), int(entry["width"])), fill, dtype=np.int32)
    for ann in _annotations(parsed, entry):
        name = _category(parsed, ann)
        if name not in by_name:
            raise CadsamError(
                f"{parsed.path}: category {name!r} is not in the class table "
                f"({', '.join(table.names)})"
            )
        labels[_pixels(parsed, entry, ann)] = IGNORE if ann.get("iscrowd") else by_name[name]
    return labels


def coco_mask(annotations: str | os.PathLike, image_stem: str, category: str) -> np.ndarray:
    """One image's binary mask for one named category: H x W bool, the union of its
    annotations (crowd regions too: they are that category's pixels)."""
    parsed = _parsed(Path(annotations))
    names = sorted(set(parsed.categories.values()))
    if category not in names:
        raise CadsamError(
            f"{parsed.path} has no category {category!r}: its categories are {', '.join(names)}"
        )
    entry = _entry(parsed, image_stem)
    mask = np.zeros((int(entry["height"]), int(entry["width"])), dtype=bool)
    for ann in _annotations(parsed, entry):
        if _category(parsed, ann) == category:
            mask |= _pixels(parsed, entry, ann)
    return mask


def coco_instances(
    annotations: str | os.PathLike, image_stem: str, category: str | None
) -> np.ndarray:
    """One image's instances of ``category`` (every category where None): H x W int32, 0
    where there is none, k for the k-th annotation in painting order (a later one wins where
    they overlap): each is an object to prompt."""
    parsed = _parsed(Path(annotations))
    if category is not None:
        coco_mask(annotations, image_stem, category)  # an unknown category: its error
    entry = _entry(parsed, image_stem)
    found = np.zeros((int(entry["height"]), int(entry["width"])), dtype=np.int32)
    chosen = [a for a in _annotations(parsed, entry) if category in (None, _category(parsed, a))]
    for k, ann in enumerate(chosen, start=1):
        found[_pixels(parsed, entry, ann)] = k
    return found


def _annotations(parsed: _Coco, entry: dict) -> list[dict]:
    """The image's annotations in painting order: crowd regions first, then by ``id``."""
    found = parsed.coco.imgToAnns.get(entry["id"], [])
    return sorted(found, key=lambda ann: (not ann.get("iscrowd"), ann["id"]))


def _category(parsed: _Coco, ann: dict) -> str:
    if ann.get("category_id") not in parsed.categories:
        raise CadsamError(
            f"{parsed.path}: annotation {ann['id']} has category_id {ann.get('category_id')!r},"
            " which no category has"
        )
    return parsed.categories[ann["category_id"]]


def _pixels(parsed: _Coco, entry: dict, ann: dict) -> np.ndarray:
    """An annotation's pixels (H x W bool), rasterised by pycocotools."""
    if "segmentation" not in ann:
        raise CadsamError(
            f"{parsed.path}: annotation {ann['id']} has no segmentation (boxes alone are no "
            "label map)"
        )
    if not ann["segmentation"]:  # an empty polygon list: nothing drawn
        return np.zeros((int(entry["height"]), int(entry["width"])), dtype=bool)
    try:
        mask = parsed.coco.annToMask(ann)
    except Exception as exc:  # pycocotools raises many types for malformed shapes
        raise CadsamError(
            f"{parsed.path}: cannot rasterise annotation {ann['id']}: {exc}"
        ) from None
    if mask.shape != (int(entry["height"]), int(entry["width"])):
        raise CadsamError(
            f"{parsed.path}: annotation {ann['id']} is {mask.shape[1]}x{mask.shape[0]} but its "
            f"image {entry['file_name']} is {entry['width']}x{entry['height']}"
        )
    return mask.astype(bool)


def _entry(parsed: _Coco, image_stem: str) -> dict:
    if image_stem not in parsed.by_stem:
        raise CadsamError(f"{parsed.path} has no image named {image_stem}")
    return parsed.by_stem[image_stem]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def _parsed(path: Path) -> _Coco:
    """The file parsed, once per process for each version of it (path, time and size)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CadsamError(f"COCO file not found: {path}") from None
    except OSError as exc:
        raise CadsamError(f"cannot read COCO file {path}: {exc.strerror or exc}") from None
    with _PARSING:
        return _parse(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=PARSED_FILES)
def _parse(shown: str, mtime_ns: int, size: int) -> _Coco:
    """``mtime_ns`` and ``size`` only key the cache: an edited file is parsed again."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise CadsamError(f"reading COCO file {shown} needs pycocotools: {LABELS_EXTRA}") from None
    try:
        with open(shown, encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError) as exc:
        raise CadsamError(f"cannot read COCO file {shown}: {' '.join(str(exc).split())}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(record, dict) or not isinstance(record.get(key), list):
            raise CadsamError(f"{shown} is no COCO file: it has no '{key}' list")
    coco = COCO()
    coco.dataset = record
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco.createIndex()
        categories = {c["id"]: str(c["name"]) for c in record["categories"]}
    except (KeyError, TypeError) as exc:
        raise CadsamError(f"{shown}: an entry lacks the field {exc}") from None
    return _Coco(Path(shown), coco, _by_stem(record["images"], shown), categories)


def _by_stem(entries: list[dict], shown: str) -> dict[str, dict]:
    by_stem: dict[str, dict] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise CadsamError(f"{shown}: an image entry is {entry!r}, not a record")
        missing = [k for k in ("id", "file_name", "height", "width") if k not in entry]
        if missing:
            which = entry.get("id", entry.get("file_name", "?"))
            raise CadsamError(f"{shown}: image entry {which} lacks {', '.join(missing)}")
        stem = Path(str(entry["file_name"]).replace("\\", "/").rsplit("/", 1)[-1]).stem
        if stem in by_stem:
            raise CadsamError(
                f"{shown}: two images named {stem}: {by_stem[stem]['file_name']}, "
                f"{entry['file_name']}"
            )
        by_stem[stem] = entry
    return by_stem
