"""The Python face of ``cadsam``: load a trained model and predict, train, evaluate.

Each function takes the settings its command takes, under the same names (a flag's name without
``--``, with ``_`` for ``-``), so a notebook and the command line run the same code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data.io import read_image, rgb_array
from .data.labels import ClassTable
from .errors import CadsamError
from .fast.runtime import Runtime
from .methods import AdaptedSam, build_model

ImageLike = str | os.PathLike | np.ndarray | Image.Image


class Predictor:
    """A model ready to answer images: each is resized to the training size, as ``cadsam
    predict`` does, and its mask comes back at the image's own size."""

    def __init__(
        self,
        model: AdaptedSam,
        image_size: int,
        device: torch.device,
        precision: str = "fp32",
    ) -> None:
        self.model = model.to(device).eval()
        self.image_size = image_size
        self.device = device
        self.precision = precision

    @property
    def method(self) -> str:
        return self.model.method

    @property
    def backbone(self) -> str:
        return self.model.backbone

    @property
    def classes(self) -> ClassTable | None:
        """The classes predicted, in index order (None: one class, binary masks)."""
        return self.model.classes

    def predict(
        self,
        images: ImageLike | Iterable[ImageLike],
        *,
        probabilities: bool = False,
        box: Iterable[float] | None = None,
        points: Iterable[Iterable[float]] = (),
    ) -> np.ndarray | list[np.ndarray]:
        """Masks (H x W bool) or, with ``probabilities``, foreground probabilities (H x W
        float32) at each image's own size: one array for one image, a list for several. With
        several classes (:attr:`classes`): label maps of class indices (H x W int64), or the
        classes' probabilities (K x H x W float32). ``box`` (x0, y0, x1, y1) and ``points``
        ((x, y) or (x, y, label)), in each image's pixels: the object to segment instead of the
        whole image; with several classes, its class on it and the ignore value elsewhere (or
        each class's sigmoid probability)."""
        from .prediction import ImagePrompt, image_prompt, predict_logits, prompted_labels

        single = _is_one_image(images)
        prompt: ImagePrompt | None = None
        if box is not None or points:
            prompt = image_prompt(box, points, "box", "points")
        outputs = []
        for image in [images] if single else images:
            logits = predict_logits(
                self.model,
                as_rgb(image, self.model.image_channels),
                self.image_size,
                self.device,
                self.precision,
                prompt,
            )
            if self.classes is not None and prompt is not None:
                labels = torch.from_numpy(prompted_labels(logits, self.classes))
                outputs.append(torch.sigmoid(logits) if probabilities else labels)
            elif self.classes is not None:
                outputs.append(torch.softmax(logits, 0) if probabilities else logits.argmax(0))
            else:
                outputs.append(torch.sigmoid(logits) if probabilities else logits > 0)
        outputs = [output.numpy() for output in outputs]
        return outputs[0] if single else outputs


def _is_one_image(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, np.ndarray, Image.Image))


def as_rgb(image: ImageLike, channels: tuple[int, ...] | None = None) -> np.ndarray:
    """A path, a Pillow image or an array (H x W grey, H x W x 3 RGB, H x W x 4 RGBA) ->
    H x W x 3 uint8 RGB, read as the command line reads files (a file's ``channels`` too)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, channels)
    if isinstance(image, Image.Image):
        return rgb_array(image)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        return np.ascontiguousarray(array[..., :3])
    if array.ndim == 2:
        return rgb_array(Image.fromarray(array))
    raise CadsamError(
        f"an image array must be H x W (grey) or H x W x 3 uint8 (RGB), got shape "
        f"{array.shape} of {array.dtype}"
    )


def load(
    weights: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    runtime: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    precision: str = "fp32",
    settings: dict[str, Any] | None = None,
) -> Predictor:
    """The model ``cadsam train`` saved (a weights file, or the run folder: its best weights,
    else its last), ready to predict. ``runtime`` and ``settings`` say how it runs (the
    command line's ``--runtime`` and ``--set``); ``checkpoint`` where its base SAM is now."""
    from .distributed import pick_device
    from .weights import load_weights, read_weights_metadata

    device = pick_device(str(device) if device is not None else None)
    method = read_weights_metadata(weights)["method"]
    chosen, _ = runtime_for(runtime, settings, device, method, precision=precision)
    model, meta = load_weights(weights, checkpoint, chosen)
    return Predictor(model.for_inference(), meta["image_size"], device, precision)


def zero_shot(
    backbone: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    image_size: int = 512,
    device: str | torch.device | None = None,
    runtime: str = "auto",
    precision: str = "fp32",
) -> Predictor:
    """SAM itself, prompted with the whole-image box: the start every fine-tune is measured
    against."""
    from .distributed import pick_device

    device = pick_device(str(device) if device is not None else None)
    chosen, _ = runtime_for(runtime, None, device, "zero-shot", precision=precision)
    model = build_model("zero-shot", backbone, checkpoint, runtime=chosen)
    return Predictor(model.for_inference(), image_size, device, precision)


def runtime_for(
    name: str,
    settings: dict[str, Any] | None,
    device: torch.device,
    method: str | None,
    job_images: int | None = None,
    precision: str | None = None,
) -> tuple[Runtime, str]:
    """The runtime called ``name`` with ``settings`` on top, checked for ``device`` and for
    ``method`` (a switch for a part the method lacks is an error), and the line saying what
    was chosen. ``method`` None: not known yet, and only the settings themselves are checked.
    ``job_images`` (images to process) and ``precision``: as
    :func:`~cadsam.fast.runtime.resolve_runtime` takes them."""
    from .fast.runtime import resolve_runtime
    from .methods import check_runtime_settings

    settings = dict(settings or {})
    if settings and method:
        check_runtime_settings(method, settings)
    return resolve_runtime(name, settings, device, job_images=job_images, precision=precision)


def train(*, config: str | os.PathLike | None = None, **settings: Any) -> Path:
    """Train as ``cadsam train`` does and return the run folder. ``settings`` are the
    command's, by name (``method``, ``backbone``, ``out``, ``images``, ``masks``, ``epochs``,
    ``batch_size``, ``lr``, ...), the model options (``adapter_size``, ``lora_rank``, ...) and
    runtime settings (``runtime="lean"``, ``cuda_graph=True``, ...); ``config`` a YAML file
    whose values they override."""
    from .config import run_config, sort_settings
    from .training import train as run

    resolved = run_config(config, sort_settings(settings))  # resume=True: the run's own config
    run(resolved)
    return Path(resolved.out)


def evaluate(
    model: Predictor | str | os.PathLike,
    *,
    batch_size: int = 4,
    resolution: str = "train",
    sod: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
    **data: Any,
) -> dict[str, float]:
    """The metrics ``cadsam eval --json`` prints, of a :class:`Predictor` or of the weights
    ``cadsam train`` saved. ``data`` names the pairs as eval's flags do: ``images`` and
    ``masks`` (with ``mask_suffix``, ``mask_threshold``, ``resize_masks``, ``skip_bad``), or
    ``dataset``, ``data_root`` and ``split``."""
    from .distributed import Dist
    from .evaluation import EvalData, evaluate_on

    predictor = model if isinstance(model, Predictor) else load(model, device=device)
    return evaluate_on(
        predictor.model,
        predictor.image_size,
        EvalData(**data),
        resolution=resolution,
        progress=progress,
        dist=Dist(device=predictor.device),
        batch_size=batch_size,
        precision=predictor.precision,
        sod=sod,
        num_workers=num_workers,
    )
