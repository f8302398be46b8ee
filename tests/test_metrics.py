"""Metrics against hand-computed cases and PySODMetrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadsam.metrics import SegmentationMeter, dice_iou_per_image


def _logits(pred):
    return torch.where(torch.tensor(pred, dtype=torch.bool), 5.0, -5.0)[None, None]


def test_dice_and_iou_by_hand():
    pred = [[1, 1, 0, 0], [1, 0, 0, 0]]
    gt = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)[None, None]
    dice, iou = dice_iou_per_image(_logits(pred), gt)
    # intersection 2, |pred| 3, |gt| 3, union 4
    assert dice.item() == pytest.approx((4 + 1e-3) / (6 + 1e-3))
    assert iou.item() == pytest.approx((2 + 1e-3) / (4 + 1e-3))
    empty = torch.zeros(1, 1, 2, 4)
    assert dice_iou_per_image(_logits([[0] * 4] * 2), empty)[0].item() == pytest.approx(1.0)


def test_per_image_mean_differs_from_dataset_level():
    meter = SegmentationMeter()
    # image 1: perfect on one pixel; image 2: 1 of 3 pixels found
    meter.update(_logits([[1, 0], [0, 0]]), torch.tensor([[[[1.0, 0], [0, 0]]]]))
    meter.update(_logits([[1, 0], [0, 0]]), torch.tensor([[[[1.0, 1], [1, 0]]]]))
    m = meter.compute()
    d2 = (2 + 1e-3) / (4 + 1e-3)
    assert m["dice"] == pytest.approx((1.0 + d2) / 2)
    assert m["dice_dataset"] == pytest.approx((4 + 1e-3) / (2 * 2 + 0 + 2 + 1e-3))
    # BER: image 1 errs nowhere; image 2 misses 2 of 3 shadow pixels, no false positive.
    assert m["ber"] == pytest.approx((0 + 100 * (2 / 3) / 2) / 2)
    assert m["ber_dataset"] == pytest.approx(100 * (2 / 4) / 2)


def test_mae_and_sod_metrics_match_pysodmetrics():
    sod = pytest.importorskip("py_sod_metrics")
    rng = np.random.default_rng(0)
    gt = np.zeros((40, 50), bool)
    gt[10:30, 15:40] = True
    prob = np.clip(gt * 0.7 + rng.random(gt.shape) * 0.3, 0, 1)
    prob[0, 0], prob[0, 1] = 0.0, 1.0  # span 0..1, so min-max normalisation is the identity
    logits = torch.logit(torch.tensor(prob, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)).float()
    meter = SegmentationMeter(sod=True)
    meter.update(logits[None, None], torch.tensor(gt)[None, None])
    ours = meter.compute()
    pred8 = np.rint(prob * 255).astype(np.uint8)
    mae, sm, wfm = sod.MAE(), sod.Smeasure(), sod.WeightedFmeasure()
    for metric in (mae, sm, wfm):
        metric.step(pred=pred8, gt=gt.astype(np.uint8) * 255)
    assert ours["mae"] == pytest.approx(mae.get_results()["mae"], abs=2e-3)
    assert ours["s_measure"] == pytest.approx(sm.get_results()["sm"], abs=1e-6)
    assert ours["weighted_f"] == pytest.approx(wfm.get_results()["wfm"], abs=1e-6)
    assert 0.5 < ours["s_measure"] <= 1.0


def test_merge_equals_one_meter():
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, 8, 8, generator=rng)
    target = (torch.rand(6, 1, 8, 8, generator=rng) > 0.5).float()
    whole = SegmentationMeter()
    whole.update(logits, target)
    a, b, merged = SegmentationMeter(), SegmentationMeter(), SegmentationMeter()
    a.update(logits[:2], target[:2])
    b.update(logits[2:], target[2:])
    merged.merge(a.state())
    merged.merge(b.state())
    assert merged.compute() == pytest.approx(whole.compute())


def test_constant_predictions_are_counted():
    gt = torch.tensor([[[[1.0, 0], [0, 0]]]])
    meter = SegmentationMeter()
    meter.update(_logits([[1, 1], [1, 1]]), gt)  # all foreground
    meter.update(_logits([[0, 0], [0, 0]]), gt)  # all background
    meter.update(_logits([[1, 0], [0, 0]]), gt)  # a real mask
    m = meter.compute()
    assert (m["predicted_all_foreground"], m["predicted_all_background"]) == (1, 1)
    # BER is a percentage: all foreground errs on every background pixel, none of the shadow
    assert meter.per_image["ber"][0] == pytest.approx(50.0)
    other = SegmentationMeter()
    other.update(_logits([[1, 1], [1, 1]]), gt)
    meter.merge(other.state())
    assert meter.compute()["predicted_all_foreground"] == 2
