"""Reading images and masks as people have them: any mode, any bit depth, EXIF-rotated."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import CadsamError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ORIENTATION_TAG = 0x0112  # EXIF: how the stored pixels are turned to be shown
TURNED = {  # how each orientation shows the stored pixels
    2: "mirrored",
    3: "turned 180 degrees",
    4: "flipped upside down",
    5: "mirrored and turned 270 degrees",
    6: "turned 90 degrees",
    7: "mirrored and turned 90 degrees",
    8: "turned 270 degrees",
}
TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height
# a mask is grey, not black and white, where more than this share of its pixels lie between
GREY_SHARE, GREY_LEVELS = 0.25, (32, 223)
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
TIFF_EXTENSIONS = (".tif", ".tiff")
# a TIFF image wider than 8 bits (16-bit, 32-bit, float) is scaled to 0..255 by its own
# percentiles: the lower one -> 0, the upper one -> 255, linear between, clipped outside
TIFF_PERCENTILES = (1.0, 99.0)
LABELS_EXTRA = "pip install 'cadsam[labels]'"
MINISWHITE, PALETTE, SEPARATED = 0, 3, 5  # TIFF photometric interpretations read apart


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise CadsamError(f"{what} not found: {path}") from None
    except Exception as exc:  # Pillow raises many types for corrupt or foreign files
        raise CadsamError(f"cannot read {what} {path}: {exc}") from None


def _to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float single-channel image -> uint8 by its type's full range."""
    array = np.asarray(image).astype(np.float64)
    top = (
        1.0
        if image.mode == "F" and array.max() <= 1.0
        else (255.0 if array.max() <= 255 else 65535.0)
    )
    return np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, channels: tuple[int, ...] | None = None) -> np.ndarray:
    """Any image file -> H x W x 3 uint8 RGB (greyscale repeated, alpha dropped, EXIF applied).

    TIFF files are read with tifffile where it is installed, so 16-bit, 32-bit, float and
    multi-channel images (H x W x C or C x H x W) read too: 8-bit values as stored; wider or
    float values scaled per image, :data:`TIFF_PERCENTILES` (1st..99th) -> 0..255, clipped
    (microscopy and remote sensing have no fixed white: the image's own range is what shows).
    ``channels``: which of the file's channels (from 0) make the image, one (repeated to grey)
    or three (R, G, B); by default the first three, or the first alone in a file of fewer than
    three. In formats other than TIFF they choose among the R, G, B read."""
    wanted = _channel_choice(channels)
    if Path(path).suffix.lower() in TIFF_EXTENSIONS:
        return _tiff_image(path, wanted)
    rgb = rgb_array(_open(path, "image"))
    return rgb if wanted is None else _channels(rgb, wanted, path)


def parse_channels(value: Any) -> tuple[int, ...] | None:
    """The ``image_channels`` setting as given (``"4,0,2"``, ``[4, 0, 2]``, ``3``) -> channel
    numbers, or None for the default."""
    if value is None or isinstance(value, tuple):
        return _channel_choice(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _channel_choice((value,))
    if isinstance(value, str):
        try:
            return _channel_choice(tuple(int(part) for part in value.split(",")))
        except ValueError:
            pass
    return _channel_choice(list(value) if isinstance(value, list) else value)


def _channel_choice(channels: Any) -> tuple[int, ...] | None:
    if channels is None:
        return None
    if not (
        isinstance(channels, (list, tuple))
        and len(channels) in (1, 3)
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels)
    ):
        raise CadsamError(
            f"channels must be one or three channel numbers (from 0), not {channels!r}"
        )
    return tuple(channels)


def _channels(array: np.ndarray, wanted: tuple[int, ...], path: str | os.PathLike) -> np.ndarray:
    """H x W x C -> H x W x 3 of the ``wanted`` channels (one is repeated to grey)."""
    count = array.shape[2]
    beyond = [c for c in wanted if c >= count]
    if beyond:
        raise CadsamError(
            f"image {path} has {count} channel(s), 0..{count - 1}: there is no channel "
            f"{beyond[0]} (channels {list(wanted)})"
        )
    picked = array[..., list(wanted)]
    return np.ascontiguousarray(np.repeat(picked, 3, axis=2) if len(wanted) == 1 else picked)


def tifffile_module() -> Any | None:
    """tifffile (the ``cadsam[labels]`` extra), or None where it is not installed."""
    try:
        import tifffile
    except ImportError:
        return None
    return tifffile


def tiff_pixels(path: str | os.PathLike, what: str) -> tuple[np.ndarray, int]:
    """(a TIFF's first series as H x W or H x W x C, its photometric interpretation), turned
    by its orientation tag as Pillow turns by EXIF. The channel axis is the file's sample axis,
    else (pages, or a plain 3-D array) the shorter of the first and the last."""
    tifffile = tifffile_module()
    if tifffile is None:
        raise CadsamError(f"reading {what} {path} needs tifffile: {LABELS_EXTRA}")
    try:
        with tifffile.TiffFile(path) as tif:
            series, page = tif.series[0], tif.pages[0]
            array, axes = series.asarray(), series.axes
            photometric = int(page.photometric)
            tag = page.tags.get("Orientation")
            turn = int(tag.value) if tag is not None else 1
    except FileNotFoundError:
        raise CadsamError(f"{what} not found: {path}") from None
    except Exception as exc:  # tifffile raises many types for corrupt or foreign files
        raise CadsamError(f"cannot read {what} {path}: {exc}") from None
    shape = array.shape
    keep = [i for i, n in enumerate(shape) if n > 1 or axes[i] in "YX"]
    array, axes = array.reshape([shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if array.ndim == 3:
        first, last = array.shape[0], array.shape[2]
        channel = axes.index("S") if "S" in axes else (0 if first <= last else 2)
        array = np.moveaxis(array, channel, -1)
    elif array.ndim != 2:
        raise CadsamError(
            f"{what} {path} has shape {tuple(shape)} ({axes}): expected H x W or H x W x channels"
        )
    return _turned(array, turn), photometric


def _turned(array: np.ndarray, turn: int) -> np.ndarray:
    """The stored pixels as an orientation tag says to show them (as ImageOps.exif_transpose)."""
    swapped = np.swapaxes(array, 0, 1)
    shown = {
        2: lambda: array[:, ::-1],
        3: lambda: np.rot90(array, 2),
        4: lambda: array[::-1],
        5: lambda: swapped,
        6: lambda: np.rot90(array, -1),
        7: lambda: np.rot90(swapped, 2),
        8: lambda: np.rot90(array, 1),
    }
    return np.ascontiguousarray(shown[turn]()) if turn in shown else array


def _tiff_image(path: str | os.PathLike, wanted: tuple[int, ...] | None) -> np.ndarray:
    if tifffile_module() is None:
        return _pillow_tiff(path, wanted)
    array, photometric = tiff_pixels(path, "image")
    if photometric in (PALETTE, SEPARATED):  # colours by a table or ink: Pillow makes them RGB
        return _pillow_tiff(path, wanted)
    if photometric == MINISWHITE and array.dtype.kind in "biu":
        array = ~array if array.dtype == bool else np.iinfo(array.dtype).max - array
    if array.ndim == 2:
        array = array[..., None]
    if wanted is None:
        wanted = (0, 1, 2) if array.shape[2] >= 3 else (0,)
    return _eight_bits(_channels(array, wanted, path))


def _pillow_tiff(path: str | os.PathLike, wanted: tuple[int, ...] | None) -> np.ndarray:
    """A TIFF as Pillow reads it: 8-bit grey, RGB, palette. Without tifffile, wider ones are an
    error naming the extra that reads them, not scaled by another rule."""
    missing = tifffile_module() is None
    try:
        image = _open(path, "image")
    except CadsamError as exc:
        if not missing:
            raise
        raise CadsamError(f"{exc} (tifffile reads more TIFFs: {LABELS_EXTRA})") from None
    if missing and image.mode in WIDE_MODES:
        raise CadsamError(f"image {path} is a {image.mode} TIFF: reading it needs {LABELS_EXTRA}")
    rgb = rgb_array(image)
    return rgb if wanted is None else _channels(rgb, wanted, path)


def _eight_bits(array: np.ndarray) -> np.ndarray:
    """uint8 as is, bool as 0/255, anything else by :data:`TIFF_PERCENTILES` (NaN -> 0; where
    the percentiles meet, the image's min..max; a flat image -> 0)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    low, high = np.percentile(values[finite], TIFF_PERCENTILES)
    if high <= low:
        low, high = values[finite].min(), values[finite].max()
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    scaled = np.where(finite, (values - low) / (high - low) * 255.0, 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def rgb_array(image: Image.Image) -> np.ndarray:
    """A Pillow image of any mode -> H x W x 3 uint8 RGB, as :func:`read_image` reads files."""
    if image.mode in WIDE_MODES:
        grey = _to_uint8(image)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


def read_mask(path: str | os.PathLike, threshold: int = 127) -> np.ndarray:
    """Any mask file -> H x W bool. 8-bit values above ``threshold`` are foreground (so lossy
    JPEG masks work); palette masks count any non-zero index; wider types are scaled to 8 bits
    first."""
    return read_mask_and_grey_share(path, threshold)[0]


def read_mask_and_grey_share(
    path: str | os.PathLike, threshold: int = 127
) -> tuple[np.ndarray, float]:
    """(:func:`read_mask`'s mask, the share of its pixels that are neither near black nor near
    white): a large share is no mask drawn in black and white (noise, a photo, a probability
    map), which thresholding turns into a mask all the same. 0 for a palette mask."""
    image = _open(path, "mask")
    if image.mode == "P":
        return np.array(image) > 0, 0.0
    grey = _to_uint8(image) if image.mode in WIDE_MODES else np.array(image.convert("L"))
    low, high = GREY_LEVELS
    share = float(((grey >= low) & (grey <= high)).mean()) if grey.size else 0.0
    return grey > threshold, share


def orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation a file records (1: shown as stored), read from its header only."""
    try:
        with Image.open(path) as image:
            return int(image.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # unreadable: reading it says so
        return 1


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) as read, after EXIF orientation."""
    return read_image(path).shape[:2]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files in ``folder``, sorted; links among them that lead to no file (a loop,
    a missing target) are left out and named in a warning, not skipped without a word."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CadsamError(f"not a folder: {folder}")
    named = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    dead = [f"{p.name} ({why})" for p in named if (why := _dead_link(p))]
    if dead:
        shown = ", ".join(dead[:8]) + (f" and {len(dead) - 8} more" if len(dead) > 8 else "")
        warn(f"skipped {len(dead)} link(s) in {folder} that lead to no file: {shown}")
    return [p for p in named if p.is_file()]


def _dead_link(path: Path) -> str | None:
    """Why a symbolic link leads to no file (a loop, a missing target), or None."""
    if not path.is_symlink() or path.exists():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python before 3.13 says a loop so
        return "a symlink loop"
    except OSError as exc:
        return "a symlink loop" if exc.errno == errno.ELOOP else "its target is missing"
    return "its target is missing"


def warn(message: str) -> None:
    """A warning on stderr, once under torchrun."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cadsam: warning: {message}", file=sys.stderr)
