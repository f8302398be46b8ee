"""Evaluation: the paper's Dice/IoU and the field's metrics over a data set."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .data import SegmentationDataset, collate, find_pairs, scan_pairs
from .data.io import parse_channels
from .data.labels import ClassTable
from .data.prompts import PromptSettings
from .distributed import Dist, gather_objects
from .errors import CadsamError
from .methods import AdaptedSam
from .methods.classes import class_answers
from .methods.prompting import Prompts
from .metrics import ClassMeter, SegmentationMeter, format_class_table
from .precision import autocast

RESOLUTIONS = ("train", "original")


@torch.no_grad()
def evaluate(
    model: AdaptedSam,
    dataset: SegmentationDataset,
    *,
    batch_size: int = 4,
    dist: Dist | None = None,
    precision: str = "fp32",
    resolution: str = "train",
    sod: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    scores: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``. ``resolution="train"`` scores at the training size
    against the resized ground truth (the paper's numbers); ``"original"`` upsamples the logits
    to each ground truth's own size. Under torchrun each rank scores every world_size-th
    image and the results are merged. ``scores``, where given, receives each image's scores by
    metric (the terms of the means; in the data set's order on one process), from which a
    caller can tell how noisy a mean is."""
    dist = dist or Dist()
    assert resolution in RESOLUTIONS, resolution
    assert resolution == "train" or dataset.keep_original, "original resolution needs keep_original"
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    prompted = getattr(dataset, "prompts", None) is not None  # each object scored as an image
    meter = _meter(model, sod, prompted)
    was_training = model.training
    model.eval()
    for batch in tqdm(
        loader,
        desc="evaluating",
        unit="batch",
        disable=not (progress and dist.is_main),
        leave=False,
    ):
        images = batch["image"].to(dist.device)
        cached = batch.get("embedding")
        embeddings = None if cached is None else cached.to(dist.device)
        if "object_masks" in batch:
            assert resolution == "train", "prompted objects are scored at the training size"
            _score_objects(model, batch, images, embeddings, meter, precision)
            continue
        with autocast(dist.device, precision):
            logits = model(images, embeddings).float()
        if resolution == "train":
            meter.update(logits, batch["mask"])
            continue
        for one, gt in zip(logits, batch["original_mask"], strict=True):
            full = F.interpolate(one[None], gt.shape, mode="bilinear", align_corners=False)
            meter.update(full, gt[None] if classes_of(model) else gt[None, None])
    model.train(was_training)
    merged = _meter(model, sod, prompted)
    for state in gather_objects(meter.state(), dist):
        merged.merge(state)
    if scores is not None and isinstance(merged, SegmentationMeter):
        scores.update(merged.per_image)
    result = merged.compute()
    if prompted:
        result = {("objects" if k == "images" else k): v for k, v in result.items()}
    return result


def _score_objects(
    model: torch.nn.Module,
    batch: dict[str, Any],
    images: torch.Tensor,
    embeddings: torch.Tensor | None,
    meter: SegmentationMeter,
    precision: str,
) -> None:
    """Each prompted object of each image (their number varies), scored as an image of its own.
    K classes: the mask of the class the model answers, and none where that is not the
    object's class, so that an object counts only with its right class."""
    parts = [key for key in ("boxes", "points", "labels") if f"prompt_{key}" in batch]
    for i in range(len(images)):
        one = Prompts(**{key: batch[f"prompt_{key}"][i][None].to(images.device) for key in parts})
        cached = None if embeddings is None else embeddings[i : i + 1]
        with autocast(images.device, precision):
            logits = model(images[i : i + 1], cached, one).float()[0]
        target = batch["object_masks"][i].to(logits.device)
        if classes_of(model) is not None:
            logits, target = _right_class_answers(logits, target)
        meter.update(logits[:, None], target[:, None])


def _right_class_answers(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """N objects' K maps and targets (class on the object, K off it, IGNORE) -> each object's
    answered mask (logits; all off where the class answered is not the object's) and mask."""
    answered, masks = class_answers(logits)
    on_object = (target >= 0) & (target < logits.shape[1])
    truth = torch.where(on_object, target, -1).flatten(1).amax(1)  # -1: no object
    right = (answered == truth) | (truth < 0)
    masks = torch.where(right[:, None, None], masks, torch.full_like(masks, -1.0))
    return masks, on_object.float()


def classes_of(model: torch.nn.Module) -> ClassTable | None:
    """The classes a model (or an exported graph run by onnxruntime) predicts; None: one
    class."""
    return getattr(model, "classes", None)


def _meter(model: AdaptedSam, sod: bool, prompted: bool) -> SegmentationMeter | ClassMeter:
    classes = classes_of(model)
    if classes is None or prompted:  # prompted objects are scored one at a time
        return SegmentationMeter(sod=sod)
    if sod:
        raise CadsamError("the SOD metrics score one class: drop --sod for several classes")
    return ClassMeter(classes.names)


def main_score(metrics: dict[str, Any]) -> float:
    """What the best epoch is chosen by: Dice, or for several classes the mean Dice over the
    classes present (mDice)."""
    return metrics["mdice"] if "mdice" in metrics else metrics["dice"]


@dataclass
class EvalData:
    """Where ``eval`` reads its pairs and how: the data flags of ``cadsam eval``, by name."""

    images: str | os.PathLike | None = None
    masks: str | os.PathLike | None = None
    dataset: str | None = None
    data_root: str | os.PathLike | None = None
    split: str = "test"
    mask_threshold: int = 127
    mask_suffix: str | None = None
    resize_masks: bool = False
    skip_bad: bool = False
    ignore_index: int | None = None  # label maps: the weights' value unless given
    coco_category: str | None = None  # masks in COCO JSON, binary task: the category
    image_channels: str | None = None  # multi-channel images: the weights' unless given
    prompt: str | None = None  # whole, box, points, box+points: the weights' unless given


def evaluate_on(
    model: AdaptedSam,
    size: int,
    data: EvalData,
    *,
    resolution: str = "train",
    progress: bool = True,
    dist: Dist | None = None,
    **scoring: Any,
) -> dict[str, float]:
    """:func:`evaluate` on the pairs ``data`` names, read and checked up front; ``scoring``
    are :func:`evaluate`'s own keywords (batch size, precision, workers, SOD metrics)."""
    dist = dist or Dist()
    pairs = find_pairs(
        data.images,
        data.masks,
        data.dataset,
        data.data_root,
        data.split,
        skip_bad=data.skip_bad,
        mask_suffix=data.mask_suffix,
    )
    reading = _reading(model, data)
    prompts = PromptSettings(data.prompt or model.prompt)
    if prompts.prompted and resolution != "train":
        raise CadsamError(
            "prompted objects are scored at the training size: drop --eval-resolution"
        )
    pairs, bad = scan_pairs(
        pairs,
        data.mask_threshold,
        data.resize_masks,
        data.skip_bad,
        progress=dist.is_main and progress,
        **reading,
    )
    dataset = SegmentationDataset(
        pairs,
        size,
        mask_threshold=data.mask_threshold,
        resize_masks=data.resize_masks,
        keep_original=resolution == "original",
        prompts=prompts,
        every_object=True,
        **reading,
    )
    metrics = evaluate(
        model.to(dist.device),
        dataset,
        dist=dist,
        resolution=resolution,
        progress=progress,
        **scoring,
    )
    if bad:
        metrics["skipped"] = len(bad)
    return {"prompt": prompts.kind, **metrics}


def _reading(model: AdaptedSam, data: EvalData) -> dict[str, Any]:
    """How ``data``'s pairs are read: as the weights say, unless ``data`` says otherwise."""
    classes = model.classes
    if data.ignore_index is not None:
        if classes is None:
            raise CadsamError("--ignore-index is for label maps: these weights predict one class")
        classes = dataclasses.replace(classes, ignore_index=data.ignore_index)
    return dict(
        classes=classes,
        coco_category=data.coco_category,
        channels=parse_channels(data.image_channels) or model.image_channels,
    )


# Units shown beside a metric's name in the table; the JSON keys are the bare names.
UNITS = {"ber": "%", "ber_dataset": "%"}


def format_table(metrics: dict[str, Any]) -> str:
    """One ``name  value`` line per metric; BER's name carries its unit: ``ber (%)``. Several
    classes: a row per class (:func:`~cadsam.metrics.format_class_table`)."""
    if "per_class" in metrics:
        return format_class_table(metrics)
    names = {k: f"{k} ({UNITS[k]})" if k in UNITS else k for k in metrics}
    width = max(len(name) for name in names.values())
    lines = []
    for key, value in metrics.items():
        if isinstance(value, str):
            shown = value
        else:
            shown = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{names[key]:<{width}}  {shown}")
    return "\n".join(lines)


def constant_masks(
    all_foreground: int, all_background: int, images: int, one_class: int = 0
) -> str | None:
    """In words, how many masks were one value everywhere ("foreground everywhere on 20 of 20
    images"; with several classes "one class everywhere"), the sign of an untrained or broken
    model; None where none was. The wording of train's validation line and of the warnings of
    eval, train and predict."""
    of = f"of {images} image{'' if images == 1 else 's'}"
    if one_class:
        return f"one class everywhere on {one_class} {of}"
    if all_foreground and all_background:
        return (
            f"foreground everywhere on {all_foreground} and background everywhere on "
            f"{all_background} {of}"
        )
    if all_foreground or all_background:
        value = "foreground" if all_foreground else "background"
        return f"{value} everywhere on {all_foreground or all_background} {of}"
    return None


CHECK_WEIGHTS = "check that the weights are trained ones for this kind of data"


def constant_prediction_warning(
    metrics: dict[str, float],
    *,
    model: str = "the model",
    result: str = "the scores describe",
    advice: str = CHECK_WEIGHTS,
) -> str | None:
    """A warning line when ``model``'s mask was one value everywhere on every image, else None.
    ``metrics`` holds the image count and how many were all foreground, all background (as
    :func:`evaluate` gives them; ``predict`` counts its masks so)."""
    n = metrics.get("images", metrics.get("objects", 0))
    fg = metrics.get("predicted_all_foreground", 0)
    bg = metrics.get("predicted_all_background", 0)
    one = metrics.get("predicted_one_class", 0)
    if not n or fg + bg + one < n:
        return None
    return (
        f"warning: {model} predicted {constant_masks(fg, bg, n, one)}: {result} no segmentation; "
        f"{advice}"
    )
