"""Prediction: a trained model's masks for new images, written at each image's own size."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .data.io import IMAGE_EXTENSIONS, list_images, read_image
from .data.labels import ClassTable
from .data.transforms import resize_image
from .errors import CadsamError
from .evaluation import classes_of, constant_prediction_warning
from .files import check_output_folder, read_text, write_atomic
from .methods import AdaptedSam
from .methods.classes import class_answers
from .methods.prompting import Prompts
from .overlay import label_overlay
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


@dataclass(frozen=True)
class MaskTargets:
    """Where predict writes each input's mask: ``<stem>.png`` in a folder, or the one file
    named (``--output mask.png`` with one input). Its _prob and _overlay siblings lie beside."""

    folder: Path
    masks: dict[Path, Path]  # input -> its mask file

    @staticmethod
    def sibling(mask: Path, kind: str) -> Path:
        return mask.with_name(f"{mask.stem}_{kind}{mask.suffix}")


def mask_targets(
    output: str | os.PathLike,
    inputs: list[Path],
    flag: str = "--output",
    siblings: tuple[str, ...] = (),
) -> MaskTargets:
    """Check where the masks go before any work: an image file name takes one input's mask;
    anything else is a folder (made when the first mask is written), never a file. Two
    inputs whose masks (or the ``siblings`` asked for: ``prob``, ``overlay``) would be one
    file are an error before anything is written: one would overwrite the other."""
    output = Path(output)
    if output.suffix.lower() in IMAGE_EXTENSIONS and not output.is_dir():
        if len(inputs) != 1:
            raise CadsamError(
                f"{flag} {output} names one mask file, but there are {len(inputs)} input images: "
                f"name a folder for their masks"
            )
        check_output_folder(output.parent, flag)
        targets = MaskTargets(output.parent, {inputs[0]: output})
    else:
        check_output_folder(output, flag)
        targets = MaskTargets(output, {path: output / f"{path.stem}.png" for path in inputs})
    written = list(targets.masks.values())
    _check_clashes(targets, siblings, flag)
    sources = {path.resolve() for path in inputs}
    for mask in written:
        for path in (mask, targets.sibling(mask, "prob"), targets.sibling(mask, "overlay")):
            if path.resolve() in sources:
                raise CadsamError(f"{flag} {output} would overwrite the input {path}")
    return targets


def _check_clashes(targets: MaskTargets, siblings: tuple[str, ...], flag: str) -> None:
    """Refuse two inputs that would write one file (``x.png`` and ``x.jpg`` both give
    ``x.png``; ``x.png``'s ``x_prob.png`` is also ``x_prob.jpg``'s mask)."""
    writers: dict[Path, Path] = {}
    for source, mask in targets.masks.items():
        for path in (mask, *(targets.sibling(mask, kind) for kind in siblings)):
            other = writers.setdefault(path, source)
            if other != source:
                raise CadsamError(
                    f"the inputs {other} and {source} would both be written as {path}: rename "
                    f"one, or predict them into different {flag} folders; nothing was written"
                )


@dataclass(frozen=True)
class ImagePrompt:
    """One object's prompt in an image's own pixels: a box (x0, y0, x1, y1) and/or points
    (x, y, label: 1 on the object, 0 off it)."""

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float, float], ...] = ()

    def for_model(self, height: int, width: int, size: int, device: torch.device) -> Prompts:
        """In the pixels of the size x size square the model reads, one image, one object."""
        scale = np.array([size / width, size / height], dtype=np.float32)
        boxes = points = labels = None
        if self.box is not None:
            boxes = torch.from_numpy(np.array(self.box, np.float32).reshape(2, 2) * scale)
            boxes = boxes.reshape(1, 1, 4).to(device)
        if self.points:
            given = np.array(self.points, dtype=np.float32)
            points = torch.from_numpy(given[:, :2] * scale)[None, None].to(device)
            labels = torch.from_numpy(given[:, 2])[None, None].to(device)
        return Prompts(boxes, points, labels)


@torch.no_grad()
def predict_logits(
    model: AdaptedSam,
    image: np.ndarray,
    size: int,
    device: torch.device,
    precision: str = "fp32",
    prompt: ImagePrompt | None = None,
) -> torch.Tensor:
    """H x W x 3 uint8 -> H x W logits (K x H x W for K classes): resized to ``size`` for the
    model exactly as the training and evaluation data are, then the logits back to the image's
    size. ``prompt``: the object to segment (default: the whole image's box); for K classes
    its K maps (sigmoid: :func:`~cadsam.methods.classes.class_answers`)."""
    resized = torch.from_numpy(resize_image(image, size)).permute(2, 0, 1)[None].float().to(device)
    prompts = None if prompt is None else prompt.for_model(*image.shape[:2], size, device)
    with autocast(device, precision):
        if prompts is None:
            logits = model(resized).float()
        else:  # the one object's maps in the place of the whole image's
            logits = model(resized, None, prompts).float()
            logits = logits[:, 0] if classes_of(model) else logits
    logits = F.interpolate(logits, image.shape[:2], mode="bilinear", align_corners=False)[0]
    return (logits if classes_of(model) else logits[0]).cpu()


def predict(
    model: AdaptedSam,
    inputs: list[Path],
    output: str | os.PathLike | MaskTargets,
    size: int,
    device: torch.device,
    precision: str = "fp32",
    probabilities: bool = False,
    overlay: bool = False,
    progress: bool = True,
    *,
    skip_bad: bool = False,
    prompts: dict[Path, ImagePrompt] | None = None,
) -> list[Path]:
    """Write ``<stem>.png`` (0/255 mask) per input into the folder ``output`` (or the one
    file it names: :func:`mask_targets`), plus ``<stem>_prob.png`` (8-bit probability) and
    ``<stem>_overlay.png`` (mask blended over the image) beside it if asked. ``prompts``: each
    input's object to segment, instead of the whole image.

    An input that cannot be read is reported on stderr (one line each) and the others are
    still written; afterwards that is an error naming how many failed and the first, unless
    ``skip_bad``. Returns the masks written."""
    kinds = tuple(k for k, asked in (("prob", probabilities), ("overlay", overlay)) if asked)
    targets = (
        output if isinstance(output, MaskTargets) else mask_targets(output, inputs, siblings=kinds)
    )
    targets.folder.mkdir(parents=True, exist_ok=True)
    model.to(device).eval()
    written, failed = [], []
    constant = {"predicted_all_foreground": 0, "predicted_all_background": 0}
    constant |= {"predicted_one_class": 0} if classes_of(model) else {}
    for path in tqdm(inputs, desc="predicting", unit="image", disable=not progress):
        try:
            image = read_image(path, getattr(model, "image_channels", None))
        except CadsamError as exc:
            tqdm.write(f"cadsam: warning: {exc} (no mask written)", file=sys.stderr)
            failed.append(str(exc))
            continue
        prompt = None if prompts is None else prompts[path]
        logits = predict_logits(model, image, size, device, precision, prompt)
        target, mask = _write_outputs(
            model, image, logits, targets.masks[path], probabilities, overlay, prompt is not None
        )
        written.append(target)
        if classes_of(model):
            constant["predicted_one_class"] += bool((mask == mask.flat[0]).all())
        else:
            constant["predicted_all_foreground"] += bool(mask.all())
            constant["predicted_all_background"] += not mask.any()
    # as eval says it: masks all one value are no segmentation, whatever wrote them
    warning = constant_prediction_warning(
        {"images": len(written), **constant}, result="the masks show"
    )
    if warning:
        tqdm.write(f"cadsam: {warning}", file=sys.stderr)
    if failed and not skip_bad:
        raise CadsamError(
            f"{len(failed)} of {len(inputs)} input(s) could not be read (first: {failed[0]}); "
            f"the other {len(written)} mask(s) are in {targets.folder} (--skip-bad: exit 0 anyway)"
        )
    return written


def _write_outputs(
    model: AdaptedSam,
    image: np.ndarray,
    logits: torch.Tensor,
    target: Path,
    probabilities: bool,
    overlay: bool,
    prompted: bool = False,
) -> tuple[Path, np.ndarray]:
    """Write one input's outputs; returns the mask's file and the mask."""
    classes = classes_of(model)
    if classes is not None:
        labels = prompted_labels(logits, classes) if prompted else logits.argmax(0).numpy()
        _write_labels(classes, image, logits, labels, target, probabilities, overlay, prompted)
        return target, labels
    mask = (logits > 0).numpy()
    save_image((mask * 255).astype(np.uint8), target)
    if probabilities:
        prob = torch.sigmoid(logits).numpy()
        save_image(np.rint(prob * 255).astype(np.uint8), MaskTargets.sibling(target, "prob"))
    if overlay:
        blend = image.astype(np.float32)
        blend[mask] = 0.5 * blend[mask] + 0.5 * OVERLAY_COLOUR
        save_image(blend.astype(np.uint8), MaskTargets.sibling(target, "overlay"))
    return target, mask


def prompted_labels(logits: torch.Tensor, classes: ClassTable) -> np.ndarray:
    """A prompted object's K maps -> a label map: the class it answers on the object, and the
    classes' ignore value (no class) everywhere else."""
    answered, mask = class_answers(logits[None])
    return np.where(mask[0].numpy() > 0, int(answered[0]), classes.ignore_index)


def _write_labels(
    classes: ClassTable,
    image: np.ndarray,
    logits: torch.Tensor,
    labels: np.ndarray,
    target: Path,
    probabilities: bool,
    overlay: bool,
    prompted: bool,
) -> None:
    """K classes: the label map (8-bit PNG, 16-bit past 256 values), the K probabilities as
    ``<name>_prob.npy`` (K x H x W float32: softmax, or a prompt's sigmoids) and the overlay
    with its legend."""
    wide = max(classes.count - 1, int(labels.max(initial=0))) > 255
    save_image(labels.astype(np.uint16 if wide else np.uint8), target)
    if probabilities:
        prob = (torch.sigmoid(logits) if prompted else torch.softmax(logits, 0)).numpy()
        path = MaskTargets.sibling(target, "prob").with_suffix(".npy")
        write_atomic(path, lambda tmp: _save_array(tmp, prob))
    if overlay:
        blend = label_overlay(image, labels, classes)
        save_image(blend, MaskTargets.sibling(target, "overlay"))


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.save would add .npy to a name
        np.save(file, array, allow_pickle=False)


def save_image(array: np.ndarray, path: Path) -> None:
    """Write an image file whole or not at all: an interrupt mid-write leaves no truncated
    file under the name of a finished one. The format is the name's (png, jpg, tif ...)."""
    image_format = Image.registered_extensions()[path.suffix.lower()]
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format=image_format))


def read_prompts(
    box: str | None, points: list[str] | None, prompts_file: str | None, inputs: list[Path]
) -> dict[Path, ImagePrompt] | None:
    """``predict``'s prompts: ``--box x0,y0,x1,y1`` and ``--point x,y[,label]`` for every input,
    or a JSON file of each image's (``{"name.png": {"box": [...], "points": [[x, y, 1]]}}``,
    by file name or stem); None: the whole image. Checked before any work."""
    if prompts_file is not None:
        if box is not None or points:
            raise CadsamError("give --prompts FILE or --box/--point, not both")
        return _prompts_from_file(Path(prompts_file), inputs)
    if box is None and not points:
        return None
    return dict.fromkeys(inputs, image_prompt(box, points or (), "--box", "--point"))


def image_prompt(box: Any, points: Any, box_said: str, points_said: str) -> ImagePrompt:
    """A box (4 numbers, or text ``x0,y0,x1,y1``) and points (each ``(x, y)`` or
    ``(x, y, label)``, or text ``x,y[,label]``) checked into a prompt; ``*_said``: how the
    user gave them, for the error."""
    return ImagePrompt(
        None if box is None else _numbers(box, box_said, (4,)),
        tuple(_point(point, points_said) for point in points),
    )


def _numbers(text: Any, flag: str, counts: tuple[int, ...]) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        values = ()
    if len(values) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise CadsamError(f"{flag} takes {wanted} numbers, not {text!r}")
    return values


def _point(text: Any, flag: str) -> tuple[float, float, float]:
    values = _numbers(text, flag, (2, 3))
    label = values[2] if len(values) == 3 else 1.0
    if label not in (0.0, 1.0):
        raise CadsamError(f"{flag} {text!r}: a point's label is 1 (on the object) or 0 (off it)")
    return values[0], values[1], label


def _prompts_from_file(path: Path, inputs: list[Path]) -> dict[Path, ImagePrompt]:
    try:
        given = json.loads(read_text(path, "prompts file"))
    except ValueError as exc:
        raise CadsamError(f"prompts file {path} is not valid JSON: {exc}") from None
    if not isinstance(given, dict):
        raise CadsamError(f"{path}: expected {{image name: {{box: [...], points: [...]}}}}")
    found, missing = {}, []
    for image in inputs:
        entry = given.get(image.name, given.get(image.stem))
        if entry is None:
            missing.append(image.name)
            continue
        where = f"{path} ({image.name})"
        if not isinstance(entry, dict):
            raise CadsamError(f'{where}: expected {{"box": [...], "points": [...]}}, not {entry!r}')
        found[image] = image_prompt(entry.get("box"), entry.get("points", ()), where, where)
        if found[image].box is None and not found[image].points:
            raise CadsamError(f"{where}: give a box or points")
    if missing:
        raise CadsamError(f"{path} has no prompt for {len(missing)} input(s): {missing[0]} ...")
    return found
