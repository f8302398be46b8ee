"""Several classes: the class table, and label files read as class indices.

A label map holds one value per pixel: a class's index (0..K-1), or the ignore value, which
no loss or score counts. Every reader returns an H x W int32 array of class indices with
:data:`IGNORE` (-1) where the file holds the ignore value, so nothing past this module needs
to know which value a data set uses for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageOps

from ..errors import CadsamError
from ..files import read_text
from .io import TIFF_EXTENSIONS, tiff_pixels, tifffile_module

IGNORE = -1  # the ignore value inside cadsam, whatever the files use
DEFAULT_IGNORE_INDEX = 255  # the files' ignore value unless a class file or --ignore-index says
MAX_CLASSES = 65535  # a 16-bit label map's room


@dataclass(frozen=True)
class ClassTable:
    """The classes a model predicts, in index order, and how label files spell them."""

    names: tuple[str, ...]
    ignore_index: int = DEFAULT_IGNORE_INDEX
    # colour-coded masks: each class's RGB colour (a file of any other colour is an error)
    colours: tuple[tuple[int, int, int], ...] | None = None
    # colour-coded masks: the colour of pixels no loss or score counts (void, unlabelled)
    ignore_colour: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if not 2 <= len(self.names) <= MAX_CLASSES:
            raise CadsamError(f"give 2 to {MAX_CLASSES} classes, not {len(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise CadsamError(f"class names repeat: {', '.join(self.names)}")
        if not 0 <= self.ignore_index <= MAX_CLASSES:
            raise CadsamError(
                f"the ignore index must be 0 to {MAX_CLASSES}, a value label files (8- or "
                f"16-bit PNG and TIFF) can hold, not {self.ignore_index}"
            )
        if self.ignore_index < len(self.names):
            raise CadsamError(
                f"the ignore index {self.ignore_index} is class {self.names[self.ignore_index]!r}:"
                f" give a value outside 0..{len(self.names) - 1}"
            )
        if self.colours is not None and len(self.colours) != len(self.names):
            raise CadsamError(f"{len(self.colours)} colours for {len(self.names)} classes")
        if self.ignore_colour is not None and self.colours is None:
            raise CadsamError("an ignore colour needs each class's colour too")
        if self.ignore_colour is not None and self.ignore_colour in self.colours:
            name = self.names[self.colours.index(self.ignore_colour)]
            raise CadsamError(f"the ignore colour {list(self.ignore_colour)} is class {name!r}'s")

    @property
    def count(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """What weights record (and :func:`class_table` reads back)."""
        record: dict[str, Any] = {"names": list(self.names), "ignore_index": self.ignore_index}
        if self.colours is not None:
            record["colours"] = [list(c) for c in self.colours]
        if self.ignore_colour is not None:
            record["ignore_colour"] = list(self.ignore_colour)
        return record


def class_table(setting: Any, ignore_index: int | None = None) -> ClassTable | None:
    """The ``classes`` setting -> a table. None: the binary task. A whole number K: classes
    named ``0``..``K-1``. A list: the names. A dict: :meth:`ClassTable.to_dict`'s record. Text:
    a class file (YAML or JSON). ``ignore_index`` overrides the file's (before the table is
    checked, so 300 classes with ``ignore_index=65535`` need no file saying so)."""
    if setting is None:
        return None
    ignore = DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index
    if isinstance(setting, ClassTable):
        return setting if ignore_index is None else replace(setting, ignore_index=ignore_index)
    if isinstance(setting, bool):
        raise CadsamError(f"classes must be a number of classes or a class file, not {setting}")
    if isinstance(setting, int) or (isinstance(setting, str) and setting.isdigit()):
        return _named("classes", tuple(str(i) for i in range(int(setting))), ignore)
    if isinstance(setting, (list, tuple)):
        return _table_from_entries(list(setting), None, "classes", ignore)
    if isinstance(setting, dict):
        return _table_from_record(setting, "classes", ignore_index)
    if isinstance(setting, (str, os.PathLike)):
        return read_class_file(setting, ignore_index)
    raise CadsamError(f"classes must be a number of classes or a class file, not {setting!r}")


def read_class_file(path: str | os.PathLike, ignore_index: int | None = None) -> ClassTable:
    """A YAML or JSON file: ``classes:`` a list of names (or of ``{name:, colour: [r, g, b]}``
    for colour-coded masks; a colour may also be ``"#rrggbb"``), or a mapping of index to name
    (``{0: background, 1: road}``, as YOLO-style data files write it); optionally
    ``ignore_index:`` (the argument, where given, overrides it) and, for colour-coded masks,
    ``ignore_colour:`` (void pixels)."""
    path = Path(path)
    text = read_text(path, "class file")
    try:
        record = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise CadsamError(
            f"class file {path} is not valid {kind}: {' '.join(str(exc).split())}"
        ) from None
    if not isinstance(record, dict) or ("classes" not in record and "names" not in record):
        raise CadsamError(f"class file {path} has no 'classes:' list")
    return _table_from_record(record, str(path), ignore_index)


def _table_from_record(
    record: dict[str, Any], where: str, ignore_index: int | None = None
) -> ClassTable:
    known = {"classes", "names", "ignore_index", "colours", "ignore_colour", "ignore_color"}
    unknown = sorted(set(record) - known)
    if unknown:
        raise CadsamError(f"{where}: unknown key(s) {', '.join(unknown)}")
    entries = _listed(record.get("classes", record.get("names")), where)
    ignore = record.get("ignore_index", DEFAULT_IGNORE_INDEX)
    if isinstance(ignore, bool) or not isinstance(ignore, int):
        raise CadsamError(f"{where}: ignore_index must be a whole number, not {ignore!r}")
    void = record.get("ignore_colour", record.get("ignore_color"))
    void = None if void is None else _colours([void], where)[0]
    ignore = ignore if ignore_index is None else ignore_index
    return _table_from_entries(entries, record.get("colours"), where, ignore, void)


def _listed(entries: Any, where: str) -> list:
    """The classes as a list: a mapping of index to name must number them 0..K-1."""
    if isinstance(entries, dict):
        try:
            numbers = sorted(int(key) for key in entries)
        except (TypeError, ValueError):
            numbers = None
        if numbers != list(range(len(entries))):
            raise CadsamError(
                f"{where}: classes numbered {list(entries)}: number them 0..{len(entries) - 1}"
            )
        return [entries[key] for key in sorted(entries, key=int)]
    if not isinstance(entries, list):
        raise CadsamError(f"{where}: 'classes' must be a list of class names")
    return entries


def _named(where: str, *fields: Any) -> ClassTable:
    """A table whose errors name where its classes come from."""
    try:
        return ClassTable(*fields)
    except CadsamError as exc:
        raise CadsamError(f"{where}: {exc}") from None


def _table_from_entries(
    entries: list,
    colours: Any,
    where: str,
    ignore: int = DEFAULT_IGNORE_INDEX,
    void: tuple[int, int, int] | None = None,
) -> ClassTable:
    names, found = [], []
    for entry in entries:
        if isinstance(entry, dict):
            names.append(str(entry.get("name", "")))
            found.append(entry.get("colour", entry.get("color")))
        else:
            names.append(str(entry))
            found.append(None)
    if any(not name for name in names):
        raise CadsamError(f"{where}: every class needs a name")
    if colours is None and any(c is not None for c in found):
        colours = found
    return _named(where, tuple(names), ignore, _colours(colours, where), void)


def _colours(colours: Any, where: str) -> tuple[tuple[int, int, int], ...] | None:
    if colours is None:
        return None
    checked = []
    for colour in colours:
        colour = _hex_colour(colour)
        if not (
            isinstance(colour, (list, tuple))
            and len(colour) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
        ):
            raise CadsamError(f"{where}: a colour must be [r, g, b] in 0..255, not {colour!r}")
        checked.append(tuple(colour))
    if len(set(checked)) != len(checked):
        raise CadsamError(f"{where}: two classes share a colour")
    return tuple(checked)


def _hex_colour(colour: Any) -> Any:
    """``"#rrggbb"`` -> [r, g, b]; anything else as given (checked by the caller)."""
    text = colour.lstrip("#") if isinstance(colour, str) else ""
    if len(text) == 6 and all(c in "0123456789abcdefABCDEF" for c in text):
        return [int(text[i : i + 2], 16) for i in (0, 2, 4)]
    return colour


def read_labels(path: str | os.PathLike, table: ClassTable) -> np.ndarray:
    """A label file -> H x W int32 class indices, :data:`IGNORE` where it holds the ignore
    value. Label maps of 8 or 16 bits in PNG (or any format Pillow reads) and TIFF (read by
    tifffile where installed: 8 to 32 bits, or float of whole values); palette PNGs as their
    indices, not their colours, even where the table has colours; colour-coded RGB masks by
    the table's colours (an RGB file whose three channels agree everywhere is a grey label map
    saved in colour, read as its values). A value that is neither a class nor the ignore value,
    or a colour of no class, is an error naming the file and the value."""
    path = Path(path)
    if path.suffix.lower() in TIFF_EXTENSIONS and tifffile_module() is not None:
        values = _tiff_label_values(path, table)
    else:
        values = _label_values(path, table)
    return _indices(values, table, path)


def _tiff_label_values(path: Path, table: ClassTable) -> np.ndarray:
    values, _ = tiff_pixels(path, "label map")
    if values.ndim == 3:
        if table.colours is not None and values.dtype == np.uint8 and values.shape[2] in (3, 4):
            return _colour_indices(values[..., :3], table, path)
        raise CadsamError(
            f"label map {path} has {values.shape[2]} channels: a label map holds one class "
            "value per pixel"
        )
    if values.dtype.kind == "f":
        whole = np.isfinite(values) & (values == np.round(values))
        if not whole.all():
            raise CadsamError(
                f"label map {path} has value {values[~whole][0]}, which is no whole class value"
            )
    return values.astype(np.int64)


def _label_values(path: Path, table: ClassTable) -> np.ndarray:
    try:
        image = Image.open(path)
        image.load()
        image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise CadsamError(f"label map not found: {path}") from None
    except Exception as exc:  # Pillow raises many types for corrupt or foreign files
        raise CadsamError(f"cannot read label map {path}: {exc}") from None
    if image.mode in ("LA", "PA"):  # the alpha of a grey or palette label map says nothing
        image = image.getchannel(0)
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image.convert("RGB"))
        if table.colours is not None:
            return _colour_indices(rgb, table, path)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return rgb[..., 0].astype(np.int64)
        raise CadsamError(
            f"label map {path} is in colour: give each class's colour in the class file "
            "(classes: [{name: ..., colour: [r, g, b]}, ...]), or save it as a label map"
        )
    if image.mode in ("1", "P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image).astype(np.int64)
    raise CadsamError(f"label map {path} is a {image.mode} image: expected whole class values")


def _colour_indices(rgb: np.ndarray, table: ClassTable, path: Path) -> np.ndarray:
    """Each pixel's class by its colour, the ignore value by the ignore colour; any other
    colour is an error."""
    wide = rgb.astype(np.int64)
    packed = (wide[..., 0] << 16) | (wide[..., 1] << 8) | wide[..., 2]
    colours = list(table.colours) + ([table.ignore_colour] if table.ignore_colour else [])
    values = np.array([*range(table.count), table.ignore_index][: len(colours)], dtype=np.int64)
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], dtype=np.int64)
    order = np.argsort(keys)
    where = np.clip(np.searchsorted(keys[order], packed), 0, len(keys) - 1)
    known = keys[order][where] == packed
    if not known.all():
        row, column = (int(i[0]) for i in np.nonzero(~known))
        colour = [int(v) for v in rgb[row, column]]
        raise CadsamError(
            f"label map {path} has colour {colour} (first at row {row}, column {column}), "
            "which is no class's in the class file"
        )
    return values[order[where]]


def _indices(values: np.ndarray, table: ClassTable, path: str | os.PathLike) -> np.ndarray:
    ignored = values == table.ignore_index
    wrong = ~ignored & ((values < 0) | (values >= table.count))
    if wrong.any():
        raise CadsamError(
            f"label map {path} has value {int(values[wrong][0])}, which is neither a class "
            f"(0..{table.count - 1}) nor the ignore index {table.ignore_index}"
        )
    return np.where(ignored, IGNORE, values).astype(np.int32)
