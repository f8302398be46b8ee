"""Prediction: a trained model's masks for new images, written at each image's own size."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .data.io import IMAGE_EXTENSIONS, list_images, read_image
from .data.transforms import resize_image
from .errors import CadsamError
from .methods import AdaptedSam
from .precision import autocast

OVERLAY_COLOUR = np.array([255, 0, 0], dtype=np.float32)


def input_files(source: str | os.PathLike) -> list[Path]:
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise CadsamError(f"not an image file: {source}")
        return [source]
    if not source.exists():
        raise CadsamError(f"input not found: {source}")
    files = list_images(source)
    if not files:
        raise CadsamError(f"no images found in {source}")
    return files


@torch.no_grad()
def predict_logits(
    model: AdaptedSam, image: np.ndarray, size: int, device: torch.device, precision: str = "fp32"
) -> torch.Tensor:
    """H x W x 3 uint8 -> H x W logits: resized to ``size`` for the model exactly as the
    training and evaluation data are, then the logits back to the image's size."""
    resized = torch.from_numpy(resize_image(image, size)).permute(2, 0, 1)[None].float().to(device)
    with autocast(device, precision):
        logits = model(resized).float()
    return F.interpolate(logits, image.shape[:2], mode="bilinear", align_corners=False)[0, 0].cpu()


def predict(
    model: AdaptedSam,
    inputs: list[Path],
    output: str | os.PathLike,
    size: int,
    device: torch.device,
    precision: str = "fp32",
    probabilities: bool = False,
    overlay: bool = False,
    progress: bool = True,
    *,
    skip_bad: bool = False,
) -> list[Path]:
    """Write ``<stem>.png`` (0/255 mask) per input, plus ``<stem>_prob.png`` (8-bit
    probability) and ``<stem>_overlay.png`` (mask blended over the image) if asked.

    An input that cannot be read is reported on stderr (one line each) and the others are
    still written; afterwards that is an error naming how many failed and the first, unless
    ``skip_bad``. Returns the masks written."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.to(device).eval()
    written, failed = [], []
    for path in tqdm(inputs, desc="predicting", unit="image", disable=not progress):
        try:
            image = read_image(path)
        except CadsamError as exc:
            tqdm.write(f"cadsam: warning: {exc} (no mask written)", file=sys.stderr)
            failed.append(str(exc))
            continue
        written.append(
            _write_outputs(
                model, image, path.stem, output, size, device, precision, probabilities, overlay
            )
        )
    if failed and not skip_bad:
        raise CadsamError(
            f"{len(failed)} of {len(inputs)} input(s) could not be read (first: {failed[0]}); "
            f"the other {len(written)} mask(s) are in {output} (--skip-bad: exit 0 anyway)"
        )
    return written


def _write_outputs(
    model: AdaptedSam,
    image: np.ndarray,
    stem: str,
    output: Path,
    size: int,
    device: torch.device,
    precision: str,
    probabilities: bool,
    overlay: bool,
) -> Path:
    logits = predict_logits(model, image, size, device, precision)
    mask = (logits > 0).numpy()
    target = output / f"{stem}.png"
    Image.fromarray((mask * 255).astype(np.uint8)).save(target)
    if probabilities:
        prob = torch.sigmoid(logits).numpy()
        Image.fromarray(np.rint(prob * 255).astype(np.uint8)).save(output / f"{stem}_prob.png")
    if overlay:
        blend = image.astype(np.float32)
        blend[mask] = 0.5 * blend[mask] + 0.5 * OVERLAY_COLOUR
        Image.fromarray(blend.astype(np.uint8)).save(output / f"{stem}_overlay.png")
    return target
