"""Label maps shown over their image: a fixed colour per class and a legend of class names."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.labels import ClassTable

# Distinct colours for the first classes; past them, hues a golden angle apart.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip
BLEND = 0.5  # the class colour's share of an overlay pixel
SWATCH = 12  # legend: a colour square's side, in pixels


def class_colours(classes: ClassTable) -> np.ndarray:
    """K x 3 uint8: the class file's colours where it gives them (colour-coded masks), else
    :data:`PALETTE` and then evenly spread hues, the same for every image and run."""
    if classes.colours is not None:
        return np.array(classes.colours, dtype=np.uint8)
    colours = list(PALETTE[: classes.count])
    for k in range(len(colours), classes.count):
        hue = (k * 0.618033988749895) % 1.0
        colours.append(tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.75, 0.9)))
    return np.array(colours, dtype=np.uint8)


def label_overlay(image: np.ndarray, labels: np.ndarray, classes: ClassTable) -> np.ndarray:
    """H x W x 3 image and H x W class indices -> the classes' colours blended over the image
    (a value past the classes, such as the ignore value, left as it is), with a legend below
    naming the classes that appear (in class order)."""
    colours = class_colours(classes)
    labelled = (labels >= 0) & (labels < classes.count)
    painted = colours[np.where(labelled, labels, 0)].astype(np.float32)
    blend = image.astype(np.float32)
    blend[labelled] = (1 - BLEND) * blend[labelled] + BLEND * painted[labelled]
    shown = [int(k) for k in np.unique(labels[labelled])]
    return _with_legend(np.rint(blend).astype(np.uint8), shown, classes, colours)


def _with_legend(
    picture: np.ndarray, shown: list[int], classes: ClassTable, colours: np.ndarray
) -> np.ndarray:
    """The legend as rows of swatch + name under the picture, as many per row as fit."""
    font = ImageFont.load_default()
    width = picture.shape[1]
    entries = [(k, classes.names[k]) for k in shown]
    sizes = [SWATCH + 4 + int(font.getlength(name)) + 12 for _, name in entries]
    rows, row, used = [], [], 0
    for entry, size in zip(entries, sizes, strict=True):
        if row and used + size > width:
            rows.append(row)
            row, used = [], 0
        row.append((entry, used))
        used += size
    rows.append(row)
    line = SWATCH + 6
    canvas = Image.new("RGB", (width, picture.shape[0] + line * len(rows) + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, entries_in_row in enumerate(rows):
        top = picture.shape[0] + 4 + r * line
        for (k, name), left in entries_in_row:
            draw.rectangle([left + 2, top, left + 2 + SWATCH, top + SWATCH], fill=tuple(colours[k]))
            draw.text((left + SWATCH + 6, top), name, fill=(0, 0, 0), font=font)
    return np.array(canvas)
