"""Segmentation metrics, computed as the paper computes them and as the field reports them.

* Dice / IoU: logits > 0, smooth 1e-3, per image, then the mean over images (the paper's);
  also dataset-level ("micro") Dice / IoU from intersections and sums over all pixels.
* MAE: mean |sigmoid(logit) - gt| per image, mean over images.
* BER (shadow detection): 100 * (1 - (TP/Npos + TN/Nneg) / 2), averaged per image (as the
  official SAM-Adapter code) and accumulated over the data set (as the shadow literature).
  In a per-image BER an image without shadow (or without background) counts that class's
  error rate as 0.
* BER is a percentage (0-100; lower is better), the other metrics are fractions (0-1).
* ``predicted_all_foreground`` / ``predicted_all_background``: how many images the model
  marked foreground (or background) everywhere, the sign of an untrained or broken model.
* With the ``sod`` extra (PySODMetrics): S-measure (alpha 0.5), mean E-measure, weighted
  F-measure, on probabilities min-max normalised per image, as the official SAM-Adapter.
"""

from __future__ import annotations

import numpy as np
import torch

SMOOTH = 1e-3


def dice_iou_per_image(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """B x 1 x H x W logits and 0/1 targets -> (dice, iou), each B."""
    pred = (logits > 0).flatten(1).double()
    gt = (target > 0.5).flatten(1).double()
    inter = (pred * gt).sum(1)
    total = pred.sum(1) + gt.sum(1)
    dice = (2 * inter + SMOOTH) / (total + SMOOTH)
    iou = (inter + SMOOTH) / (total - inter + SMOOTH)
    return dice, iou


class SegmentationMeter:
    """Accumulates per-image and dataset-level statistics; ``compute()`` gives the metrics."""

    def __init__(self, sod: bool = False) -> None:
        self.per_image: dict[str, list[float]] = {"dice": [], "iou": [], "mae": [], "ber": []}
        if sod:
            _require_pysodmetrics()
            self.per_image.update(s_measure=[], e_measure_mean=[], weighted_f=[])
        self.sod = sod
        # tp, fp, fn, tn over the whole data set
        self.totals = torch.zeros(4, dtype=torch.float64)
        # images predicted foreground everywhere, background everywhere
        self.constant = [0, 0]

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """One image at a time or a batch: B x 1 x H x W logits and 0/1 targets."""
        logits, target = logits.detach().float().cpu(), target.detach().cpu()
        dice, iou = dice_iou_per_image(logits, target)
        self.per_image["dice"] += dice.tolist()
        self.per_image["iou"] += iou.tolist()
        prob = torch.sigmoid(logits)
        gt = target > 0.5
        self.per_image["mae"] += (prob - gt.float()).abs().flatten(1).mean(1).tolist()
        pred = logits > 0
        for p, g, pr in zip(pred, gt, prob, strict=True):
            tp, fp = (p & g).sum().item(), (p & ~g).sum().item()
            fn, tn = (~p & g).sum().item(), (~p & ~g).sum().item()
            self.totals += torch.tensor([tp, fp, fn, tn], dtype=torch.float64)
            self.per_image["ber"].append(_ber(tp, fp, fn, tn))
            self.constant[0] += int(fn + tn == 0)
            self.constant[1] += int(tp + fp == 0)
            if self.sod:
                for key, value in sod_scores(pr[0].numpy(), g[0].numpy()).items():
                    self.per_image[key].append(value)

    def state(self) -> dict:
        """What another rank needs to merge (see :meth:`merge`)."""
        return {
            "per_image": self.per_image,
            "totals": self.totals.tolist(),
            "constant": list(self.constant),
        }

    def merge(self, state: dict) -> None:
        for key, values in state["per_image"].items():
            self.per_image[key] += values
        self.totals += torch.tensor(state["totals"], dtype=torch.float64)
        self.constant = [a + b for a, b in zip(self.constant, state["constant"], strict=True)]

    def compute(self) -> dict[str, float]:
        tp, fp, fn, tn = self.totals.tolist()
        return {
            "images": len(self.per_image["dice"]),
            **{key: _mean(values) for key, values in self.per_image.items()},
            "dice_dataset": (2 * tp + SMOOTH) / (2 * tp + fp + fn + SMOOTH),
            "iou_dataset": (tp + SMOOTH) / (tp + fp + fn + SMOOTH),
            "ber_dataset": _ber(tp, fp, fn, tn),
            "predicted_all_foreground": self.constant[0],
            "predicted_all_background": self.constant[1],
        }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _ber(tp: float, fp: float, fn: float, tn: float) -> float:
    pos_err = fn / (tp + fn) if tp + fn else 0.0
    neg_err = fp / (tn + fp) if tn + fp else 0.0
    return 100.0 * (pos_err + neg_err) / 2


def _require_pysodmetrics() -> None:
    try:
        import py_sod_metrics  # noqa: F401
    except ImportError:
        from .errors import CadsamError

        raise CadsamError(
            "S-measure, E-measure and weighted F need PySODMetrics: pip install 'cadsam[sod]'"
        ) from None


def sod_scores(prob: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """PySODMetrics' S-measure, mean E-measure and weighted F of one image. The data-set
    figures are the means of these per-image values, as PySODMetrics computes them."""
    import py_sod_metrics as sod

    pred = np.rint(prob * 255).astype(np.uint8)  # min-max normalised by PySODMetrics
    gt8 = gt.astype(np.uint8) * 255
    sm, em, wfm = sod.Smeasure(alpha=0.5), sod.Emeasure(), sod.WeightedFmeasure()
    for metric in (sm, em, wfm):
        metric.step(pred=pred, gt=gt8)
    return {
        "s_measure": float(sm.get_results()["sm"]),
        "e_measure_mean": float(em.get_results()["em"]["curve"].mean()),
        "weighted_f": float(wfm.get_results()["wfm"]),
    }
