"""Evaluation: the paper's Dice/IoU and the field's metrics over a data set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .data import SegmentationDataset, collate
from .distributed import Dist, gather_objects
from .methods import AdaptedSam
from .metrics import SegmentationMeter
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
) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``. ``resolution="train"`` scores at the training size
    against the resized ground truth (the paper's numbers); ``"original"`` upsamples the logits
    to each ground truth's own size. Under torchrun each rank scores every world_size-th
    image and the results are merged."""
    dist = dist or Dist()
    assert resolution in RESOLUTIONS, resolution
    assert resolution == "train" or dataset.keep_original, "original resolution needs keep_original"
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    meter = SegmentationMeter(sod=sod)
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
        with autocast(dist.device, precision):
            logits = model(images, embeddings).float()
        if resolution == "train":
            meter.update(logits, batch["mask"])
            continue
        for one, gt in zip(logits, batch["original_mask"], strict=True):
            full = F.interpolate(one[None], gt.shape, mode="bilinear", align_corners=False)
            meter.update(full, gt[None, None])
    model.train(was_training)
    merged = SegmentationMeter(sod=sod)
    for state in gather_objects(meter.state(), dist):
        merged.merge(state)
    return merged.compute()


# Units shown beside a metric's name in the table; the JSON keys are the bare names.
UNITS = {"ber": "%", "ber_dataset": "%"}


def format_table(metrics: dict[str, float]) -> str:
    """One ``name  value`` line per metric; BER's name carries its unit: ``ber (%)``."""
    names = {k: f"{k} ({UNITS[k]})" if k in UNITS else k for k in metrics}
    width = max(len(name) for name in names.values())
    lines = []
    for key, value in metrics.items():
        shown = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{names[key]:<{width}}  {shown}")
    return "\n".join(lines)


def constant_prediction_warning(metrics: dict[str, float]) -> str | None:
    """A warning line when the model's mask was the same constant on every image, else None."""
    n = metrics.get("images", 0)
    fg = metrics.get("predicted_all_foreground", 0)
    bg = metrics.get("predicted_all_background", 0)
    if not n or fg + bg < n:
        return None
    if fg == n:
        what = f"foreground everywhere on every image ({fg} of {n})"
    elif bg == n:
        what = f"background everywhere on every image ({bg} of {n})"
    else:
        what = f"a constant mask on every image ({fg} all foreground, {bg} all background)"
    return (
        f"warning: the model predicted {what}: the scores describe no segmentation; "
        "check that the weights are trained ones for this kind of data"
    )
