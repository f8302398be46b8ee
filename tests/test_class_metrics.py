"""K-class scores against a by-hand case and a plain numpy confusion matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cadsam.data.labels import IGNORE
from cadsam.metrics import ClassMeter, format_class_table

NAMES = ("background", "road", "car", "sky")


def _logits(pred: np.ndarray, k: int, seed: int = 0) -> torch.Tensor:
    """B x K x H x W logits whose argmax over K is ``pred`` (B x H x W), the winner by 1+."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(pred.shape[0], k, *pred.shape[1:]))
    top = logits.max(1)
    np.put_along_axis(logits, pred[:, None], (top + 1.0)[:, None], axis=1)
    return torch.tensor(logits, dtype=torch.float32)


def _case() -> tuple[np.ndarray, np.ndarray]:
    """3 images of 5 x 7, K = 4: ground truth uses classes 0 and 1 (plus an ignored block);
    the prediction also uses class 2 ("car", absent from the ground truth); class 3 ("sky")
    is in neither. Image 2 is predicted "background" everywhere."""
    rng = np.random.default_rng(36)
    gt = rng.integers(0, 2, size=(3, 5, 7))
    gt[0, :2, :3] = IGNORE
    gt[1, 4, :] = IGNORE
    pred = rng.integers(0, 3, size=(3, 5, 7))
    pred[2] = 0
    return gt, pred


def _reference(gt: np.ndarray, pred: np.ndarray, k: int) -> dict:
    """The scores from a confusion matrix built pixel by pixel with numpy."""
    valid = gt != IGNORE
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (gt[valid], pred[valid]), 1)
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    present = cm.sum(1) > 0
    iou, dice = tp[present] / (tp + fp + fn)[present], 2 * tp[present] / (2 * tp + fp + fn)[present]
    one_class = sum(len(np.unique(p)) == 1 for p in pred)
    return {
        "cm": cm,
        "present": present,
        "iou": iou,
        "dice": dice,
        "miou": iou.mean(),
        "mdice": dice.mean(),
        "pixel_accuracy": tp.sum() / valid.sum(),
        "predicted_one_class": one_class,
    }


def _meter(gt: np.ndarray, pred: np.ndarray, names=NAMES, batches=(slice(None),)) -> ClassMeter:
    meter = ClassMeter(names)
    logits = _logits(pred, len(names))
    for part in batches:
        meter.update(logits[part], torch.tensor(gt[part], dtype=torch.int32))
    return meter


def test_scores_match_a_numpy_confusion_matrix():
    gt, pred = _case()
    ref = _reference(gt, pred, len(NAMES))
    # the case covers what it claims to
    assert ref["present"].tolist() == [True, True, False, False]
    assert ref["cm"][:, 2].sum() > 0 and ref["cm"][:, 3].sum() == 0
    assert ((gt == IGNORE) & (pred == 2)).any()  # a prediction that must not count
    meter = _meter(gt, pred)
    assert torch.equal(meter.confusion, torch.tensor(ref["cm"]))
    m = meter.compute()
    assert m["images"] == 3
    assert m["predicted_one_class"] == ref["predicted_one_class"] == 1
    assert m["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"])
    assert m["miou"] == pytest.approx(ref["miou"])
    assert m["mdice"] == pytest.approx(ref["mdice"])
    assert list(m["per_class"]) == list(NAMES)
    for i, name in enumerate(NAMES[:2]):
        assert m["per_class"][name]["iou"] == pytest.approx(ref["iou"][i])
        assert m["per_class"][name]["dice"] == pytest.approx(ref["dice"][i])
    for i, name in enumerate(NAMES):
        assert m["per_class"][name]["pixels"] == ref["cm"][i].sum()
        assert m["per_class"][name]["predicted"] == ref["cm"][:, i].sum()
    for name in ("car", "sky"):
        assert m["per_class"][name]["iou"] is None and m["per_class"][name]["dice"] is None
    json.loads(json.dumps(m))  # plain types only


def test_a_tiny_case_by_hand():
    # gt   0 0  1      pred 0 2 1
    #      1 1 ign          1 0 2
    # valid pixels (gt, pred): (0,0) (0,2) (1,1) (1,1) (1,0); the ignored pixel's 2 is not counted
    # confusion rows gt, columns pred: [1 0 1] [1 2 0] [0 0 0]
    # class 0: TP 1, FP 1, FN 1 -> IoU 1/3, Dice 2/4
    # class 1: TP 2, FP 0, FN 1 -> IoU 2/3, Dice 4/5
    # class 2: absent from the gt, predicted once -> no score, out of the means
    # mIoU (1/3 + 2/3) / 2 = 1/2, mDice (1/2 + 4/5) / 2 = 13/20, accuracy 3/5
    gt = np.array([[[0, 0, 1], [1, 1, IGNORE]]])
    pred = np.array([[[0, 2, 1], [1, 0, 2]]])
    m = _meter(gt, pred, names=("a", "b", "c")).compute()
    assert m["per_class"]["a"] == {
        "iou": pytest.approx(1 / 3),
        "dice": pytest.approx(1 / 2),
        "pixels": 2,
        "predicted": 2,
    }
    assert m["per_class"]["b"] == {
        "iou": pytest.approx(2 / 3),
        "dice": pytest.approx(4 / 5),
        "pixels": 3,
        "predicted": 2,
    }
    assert m["per_class"]["c"] == {"iou": None, "dice": None, "pixels": 0, "predicted": 1}
    assert m["miou"] == pytest.approx(1 / 2)
    assert m["mdice"] == pytest.approx(13 / 20)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    assert m["images"] == 1 and m["predicted_one_class"] == 0


def test_merged_ranks_equal_one_meter():
    gt, pred = _case()
    whole = _meter(gt, pred)
    first, second = _meter(gt[:2], pred[:2]), _meter(gt[2:], pred[2:])
    first.merge(json.loads(json.dumps(second.state())))  # states travel as plain objects
    assert torch.equal(first.confusion, whole.confusion)
    assert first.compute() == whole.compute()
    with pytest.raises(ValueError, match="merge"):
        ClassMeter(("x", "y")).merge(whole.state())


def test_batches_do_not_change_the_scores():
    gt, pred = _case()
    together = _meter(gt, pred)
    apart = _meter(gt, pred, batches=(slice(0, 1), slice(1, 2), slice(2, 3)))
    uneven = _meter(gt, pred, batches=(slice(0, 2), slice(2, 3)))
    assert torch.equal(together.confusion, apart.confusion)
    assert together.compute() == apart.compute() == uneven.compute()


def test_bad_inputs_are_refused():
    meter = ClassMeter(("a", "b"))
    with pytest.raises(ValueError, match="B x 2 x H x W"):
        meter.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not match"):
        meter.update(torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="holds 2"):
        meter.update(torch.zeros(1, 2, 2, 2), torch.tensor([[[0, 1], [2, IGNORE]]]))
    assert meter.images == 0 and int(meter.confusion.sum()) == 0


def test_an_all_ignored_image_counts_only_as_an_image():
    meter = ClassMeter(("a", "b"))
    meter.update(_logits(np.array([[[0, 1], [1, 1]]]), 2), torch.full((1, 2, 2), IGNORE))
    m = meter.compute()
    assert m["images"] == 1 and int(meter.confusion.sum()) == 0
    assert np.isnan(m["miou"]) and np.isnan(m["pixel_accuracy"])
    assert "nan" in format_class_table(m)


def test_the_table_names_every_class_and_marks_absent_ones():
    gt, pred = _case()
    long_name = "a class name far longer than any terminal column should be"
    names = (*NAMES[:3], long_name)
    m = _meter(gt, pred, names=names).compute()
    table = format_class_table(m)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in NAMES[:3]:
        assert any(line.startswith(name) for line in lines)
    assert long_name not in table and any(line.startswith(long_name[:20]) for line in lines)
    car = next(line for line in lines if line.startswith("car"))
    assert car.split()[1:3] == ["-", "-"] and car.endswith("*")
    road = next(line for line in lines if line.startswith("road"))
    assert road.split()[1] == f"{m['per_class']['road']['iou']:.4f}"
    assert "*" not in road
    assert f"{m['miou']:.4f}" in next(line for line in lines if line.startswith("mIoU"))
    assert f"{m['pixel_accuracy']:.4f}" in table
    assert "not in the ground truth" in table
