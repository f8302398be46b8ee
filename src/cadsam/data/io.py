"""Reading images and masks as people have them: any mode, any bit depth, EXIF-rotated."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Any image file -> H x W x 3 uint8 RGB (greyscale repeated, alpha dropped, EXIF applied)."""
    return rgb_array(_open(path, "image"))


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
