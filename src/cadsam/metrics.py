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

K classes (:class:`ClassMeter`), from one K x K confusion matrix over the whole data set (rows
the ground truth, columns the prediction = argmax of the K logits), without smoothing:

* Pixels whose ground truth is the ignore value (:data:`~cadsam.data.labels.IGNORE`) count
  nowhere: not in the matrix, the accuracy, or either pixel count.
* IoU_k = TP/(TP+FP+FN), Dice_k = 2TP/(2TP+FP+FN), for each class k present in the ground
  truth (at least one pixel of it). A class absent from the ground truth has no score (null):
  predicted somewhere, its IoU would be 0, yet it is left out of the means; those pixels still
  lower the scores of the classes they truly belong to (as their false negatives).
* mIoU / mDice: the mean of IoU_k / Dice_k over the classes present in the ground truth.
* Pixel accuracy: correct pixels / pixels not ignored.
* ``predicted_one_class``: how many images the model marked one class everywhere (ignored
  pixels included), as ``predicted_all_foreground`` above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data.labels import IGNORE

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


class ClassMeter:
    """Accumulates the K-class confusion matrix over a data set; ``compute()`` gives the
    scores of each class and their means (see the module's notes)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        if len(names) < 2:
            raise ValueError(f"a class meter needs 2 or more class names, not {len(names)}")
        self.names = tuple(names)
        k = len(self.names)
        # rows: ground truth, columns: prediction
        self.confusion = torch.zeros(k, k, dtype=torch.int64)
        self.images = 0
        self.predicted_one_class = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """A batch: B x K x H x W logits and B x H x W class indices (or IGNORE). Counts on the
        logits' device; only the K x K counts come back to the CPU."""
        k = len(self.names)
        if logits.dim() != 4 or logits.shape[1] != k:
            raise ValueError(f"logits must be B x {k} x H x W, not {tuple(logits.shape)}")
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
            )
        pred = logits.detach().argmax(1)
        gt = target.detach().to(pred.device, torch.int64)
        valid = gt != IGNORE
        gt, hits = gt[valid], pred[valid]
        if gt.numel() and (gt.min() < 0 or gt.max() >= k):
            bad = gt[(gt < 0) | (gt >= k)][0].item()
            raise ValueError(f"target holds {bad}: class indices are 0..{k - 1} or {IGNORE}")
        counts = torch.bincount(gt * k + hits, minlength=k * k)
        self.confusion += counts.reshape(k, k).cpu()
        flat = pred.flatten(1)
        self.images += flat.shape[0]
        self.predicted_one_class += int((flat == flat[:, :1]).all(1).sum().item())

    def state(self) -> dict:
        """What another rank needs to merge (see :meth:`merge`): plain lists and ints."""
        return {
            "names": list(self.names),
            "confusion": self.confusion.tolist(),
            "images": self.images,
            "predicted_one_class": self.predicted_one_class,
        }

    def merge(self, state: dict) -> None:
        if tuple(state["names"]) != self.names:
            raise ValueError(f"cannot merge classes {state['names']} into {list(self.names)}")
        self.confusion += torch.tensor(state["confusion"], dtype=torch.int64)
        self.images += state["images"]
        self.predicted_one_class += state["predicted_one_class"]

    def compute(self) -> dict[str, Any]:
        cm = self.confusion.double()
        tp = cm.diagonal()
        gt_pixels, predicted = self.confusion.sum(1), self.confusion.sum(0)
        fp, fn = predicted.double() - tp, gt_pixels.double() - tp
        present = gt_pixels > 0
        iou = tp / (tp + fp + fn).clamp(min=1)
        dice = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        total = float(cm.sum())
        per_class = {
            name: {
                "iou": float(iou[i]) if present[i] else None,
                "dice": float(dice[i]) if present[i] else None,
                "pixels": int(gt_pixels[i]),
                "predicted": int(predicted[i]),
            }
            for i, name in enumerate(self.names)
        }
        return {
            "images": self.images,
            "pixel_accuracy": float(tp.sum()) / total if total else float("nan"),
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "mdice": float(dice[present].mean()) if present.any() else float("nan"),
            "per_class": per_class,
            "predicted_one_class": self.predicted_one_class,
        }


CLASS_NAME_WIDTH = 30  # longer class names are cut to fit 80 columns


def format_class_table(metrics: dict[str, Any]) -> str:
    """:meth:`ClassMeter.compute`'s scores as a terminal table: a row per class (classes absent
    from the ground truth show ``-`` and a ``*``), then the means and the pixel accuracy."""
    per_class = metrics["per_class"]
    gt_total = sum(c["pixels"] for c in per_class.values())
    pred_total = sum(c["predicted"] for c in per_class.values())
    labels = ["mIoU", "mDice", "pixel accuracy", "images"]
    width = max(len(n) for n in [*(_cut(name) for name in per_class), *labels])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}  {'GT %':>6}  {'pred %':>6}"]
    absent = 0
    for name, scores in per_class.items():
        mark = "" if scores["iou"] is not None else " *"
        absent += bool(mark)
        lines.append(
            f"{_cut(name):<{width}}  {_score(scores['iou'])}  {_score(scores['dice'])}  "
            f"{_share(scores['pixels'], gt_total)}  {_share(scores['predicted'], pred_total)}"
            f"{mark}"
        )
    means = [("mIoU", metrics["miou"]), ("mDice", metrics["mdice"])]
    means.append(("pixel accuracy", metrics["pixel_accuracy"]))
    lines += [f"{label:<{width}}  {value:.4f}" for label, value in means]
    lines.append(f"{'images':<{width}}  {metrics['images']:d}")
    if absent:
        lines.append("* not in the ground truth: no score, left out of mIoU and mDice")
    return "\n".join(lines)


def _cut(name: str) -> str:
    return name if len(name) <= CLASS_NAME_WIDTH else name[: CLASS_NAME_WIDTH - 3] + "..."


def _score(value: float | None) -> str:
    return f"{'-':>6}" if value is None else f"{value:6.4f}"


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:6.2f}" if total else f"{'-':>6}"
