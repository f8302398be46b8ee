"""Prompts on a model of several classes: each object of each class is prompted, answers in its
class's map, is scored only with its right class, and is written as a label map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_classes import NAMES, camvid, train_args  # noqa: F401 (a fixture)

import cadsam
from cadsam.commands import main
from cadsam.data.dataset import SegmentationDataset
from cadsam.data.labels import IGNORE, class_table
from cadsam.data.pairs import Pair
from cadsam.data.prompts import PromptSettings, class_objects
from cadsam.evaluation import _right_class_answers
from cadsam.methods.classes import class_answers
from cadsam.methods.prompting import Prompts
from cadsam.step import object_loss, segmentation_loss


def label_map() -> np.ndarray:
    """Class 0 in two blocks, class 2 in one, a speck-free background of class 1, IGNORE."""
    labels = np.ones((30, 40), dtype=np.int64)
    labels[2:8, 2:10] = 0
    labels[20:28, 30:38] = 0
    labels[10:18, 12:25] = 2
    labels[0:2, 30:40] = IGNORE
    return labels


def test_each_class_component_is_an_object_of_its_class():
    found, object_class = class_objects(label_map(), 3)
    assert object_class.tolist() == [-1, 0, 0, 1, 2]  # id 0 is no object
    for k in range(1, 5):
        on = found == k
        values = np.unique(label_map()[on])
        assert values.tolist() == [object_class[k]]
    assert (found[label_map() == IGNORE] == 0).all() and (found > 0).sum() == 30 * 40 - 20
    assert {tuple(np.argwhere(found == 1).min(0))} | {tuple(np.argwhere(found == 2).min(0))} == {
        (2, 2),
        (20, 30),
    }


def test_object_loss_of_one_class_is_the_binary_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 1, 16, 16, generator=gen)
    masks = torch.rand(2, 3, 16, 16, generator=gen) > 0.6
    binary = object_loss(logits[:, :, 0], masks.float())
    as_classes = object_loss(logits, torch.where(masks, 0, 1))  # class 0 on it, 1 (= K) off it
    reference = segmentation_loss(logits.flatten(0, 1), masks.flatten(0, 1)[:, None].float())
    assert binary.item() == pytest.approx(reference.item(), rel=1e-6)
    assert as_classes.item() == pytest.approx(reference.item(), rel=1e-6)


def test_object_loss_of_classes_equals_a_float64_reference_and_skips_ignored_pixels():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 3, 8, 8, generator=gen, dtype=torch.float64)
    target = torch.full((1, 2, 8, 8), 3)  # K = 3: no class
    target[0, 0, 1:4, 1:5] = 2
    target[0, 1, 5:8, 0:3] = 0
    target[0, :, 0, :] = IGNORE
    loss = object_loss(logits, target)
    # by hand: sigmoid BCE over valid pixels of every map, + per object 1 - soft IoU
    p = 1 / (1 + np.exp(-logits.numpy()[0]))
    t = target.numpy()[0]
    valid = (t != IGNORE)[:, None]
    onehot = np.stack([(t == k) for k in range(3)], 1).astype(float)
    bce = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
    expected = (bce * valid).sum() / (valid.sum() * 3)
    for o in range(2):
        inter = (p[o] * onehot[o] * valid[o]).sum()
        union = (p[o] * valid[o]).sum() + onehot[o].sum() - inter
        expected += (1 - (inter + 1e-3) / (union + 1e-3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    changed = logits.clone()
    changed[0, :, :, 0, :] += 5  # the ignored row
    assert object_loss(changed, target).item() == pytest.approx(loss.item(), rel=1e-12)


def test_dataset_targets_are_the_object_in_its_class(tmp_path):
    labels = label_map()
    Image.fromarray(np.where(labels == IGNORE, 11, labels).astype(np.uint8)).save(
        tmp_path / "a.png"
    )
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.jpg")
    classes = class_table({"names": ["x", "y", "z"], "ignore_index": 11})
    settings = PromptSettings("box", box_jitter=0.0)
    data = SegmentationDataset(
        [Pair("a", tmp_path / "a.jpg", tmp_path / "a.png")],
        40,
        classes=classes,
        prompts=settings,
        every_object=True,
        resize_masks=True,
    )
    item = data[0]
    targets, boxes = item["object_masks"], item["prompt_boxes"]
    assert targets.dtype == torch.int64 and targets.shape[0] == 4
    for target, box in zip(targets, boxes, strict=True):
        on = (target >= 0) & (target < 3)
        kinds = target[on].unique().tolist()
        assert len(kinds) == 1  # one object, one class
        rows, cols = torch.nonzero(on, as_tuple=True)
        assert box.tolist() == [cols.min(), rows.min(), cols.max(), rows.max()]
        assert ((target == IGNORE) == (item["mask"] == IGNORE)).all()
        assert (target[~on & (target != IGNORE)] == 3).all()


def test_an_object_counts_only_with_its_right_class():
    logits = torch.full((3, 4, 5, 5), -3.0)
    logits[0, 2, :2, :2] = 4.0  # object 0, class 2: answered 2, right
    logits[1, 1, 3:, 3:] = 5.0  # object 1, class 0: answered 1, wrong
    logits[1, 0, 3:, 3:] = 2.0
    answered, masks = class_answers(logits)
    assert answered.tolist() == [2, 1, 0] and torch.equal(masks[1], logits[1, 1])
    target = torch.full((3, 5, 5), 4)
    target[0, :2, :2], target[1, 3:, 3:] = 2, 0  # object 2 is none: nothing there
    scored, truth = _right_class_answers(logits, target)
    assert (scored[0] > 0).sum() == 4 and not (scored[1] > 0).any() and not (scored[2] > 0).any()
    assert truth.sum((1, 2)).tolist() == [4, 4, 0]


@pytest.fixture(scope="module")
def camvid_boxes(camvid, tmp_path_factory):  # noqa: F811 (the fixture)
    """decoder, 11 classes, trained on box prompts for one tiny epoch (the CamVid sample)."""
    run = tmp_path_factory.mktemp("boxes") / "run"
    assert main(train_args(camvid, run, "decoder", "vit_tiny", "--prompt", "box")) == 0
    return camvid, run


def test_camvid_boxes_train_eval_predict(camvid_boxes, tmp_path, capsys):
    """The run records its prompt and validates on objects; eval scores each object of each
    class; predict with a box writes one class on the object and the ignore value elsewhere,
    that class the one whose map holds the most confident pixel of the saved probabilities."""
    root, run = camvid_boxes
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "objects" in last["val"] and "dice" in last["val"]
    capsys.readouterr()
    data = ["--images", str(root / "val/images"), "--masks", str(root / "val/labels")]
    assert main(["eval", "--weights", str(run), *data, "--json", "--no-progress"]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert scores["prompt"] == "box" and scores["objects"] > 2 * 2  # several per image
    image = sorted((root / "val/images").iterdir())[0]
    box = "100,150,300,330"
    out = tmp_path / "mask.png"
    argv = ["predict", "--weights", str(run), "--images", str(image), "--out", str(out)]
    assert main([*argv, "--box", box, "--probabilities", "--no-progress"]) == 0
    written = np.array(Image.open(out))
    prob = np.load(tmp_path / "mask_prob.npy")
    assert written.shape == (360, 480) and prob.shape == (11, 360, 480)
    answered = int(prob.reshape(11, -1).max(1).argmax())
    np.testing.assert_array_equal(written, np.where(prob[answered] > 0.5, answered, 11))
    predictor = cadsam.load(run, device="cpu")
    labels = predictor.predict(image, box=[100, 150, 300, 330])
    np.testing.assert_array_equal(labels, written)
    assert NAMES[answered] in predictor.classes.names


@pytest.mark.parametrize("backbone", ["vit_tiny", "sam2.1_hiera_tiny_test"])
def test_prompted_class_maps_start_as_sams_prompted_masks(backbone):
    """With 4 classes the decoder's tokens are SAM's own: class 0's map answers a box and
    points as the binary model's one mask does (itself Meta's, tests/test_prompts.py)."""
    models = []
    for classes in (None, class_table(4)):
        torch.manual_seed(0)
        models.append(cadsam.build_model("decoder", backbone, classes=classes).eval())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 50.0]] * 3] * 2)
    points = torch.tensor([[[[20.0, 30.0]]] * 3] * 2)
    prompts = Prompts(boxes, points, torch.ones(2, 3, 1))
    with torch.no_grad():
        one, four = (model(images, None, prompts) for model in models)
    assert one.shape == (2, 3, 64, 64) and four.shape == (2, 3, 4, 64, 64)
    torch.testing.assert_close(four[:, :, 0], one, rtol=1e-4, atol=1e-5)
