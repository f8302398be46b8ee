"""Boxes and points: drawn from the masks, taken by the model as Meta's SAM takes them, in
training (from images and from the cache), eval and predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, randomize_
from PIL import Image
from test_sam_parity import meta_tiny_sam

import cadsam
from cadsam.commands import main
from cadsam.data.prompts import PromptSettings, draw_prompts
from cadsam.methods.prompting import Prompts

KVASIR = SHARED_DATA / "kvasir-seg-sample"


def two_objects() -> np.ndarray:
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:15, 4:20] = True  # rows 5..14, columns 4..19
    mask[25:38, 30:45] = True
    return mask


def test_every_object_gets_its_box_and_points_inside():
    """Without jitter each box is its object's bounds; points lie on their object (label 1),
    negatives off it (label 0); each object's target is that object alone."""
    mask = two_objects()
    settings = PromptSettings("box+points", points=3, negatives=2, box_jitter=0.0)
    drawn = draw_prompts(mask, settings, np.random.default_rng(0), every=True)
    assert drawn["masks"].shape == (2, 40, 50)
    expected = sorted([[4, 5, 19, 14], [30, 25, 44, 37]])
    assert sorted(drawn["boxes"].tolist()) == expected
    for target, points, labels in zip(
        drawn["masks"], drawn["points"], drawn["labels"], strict=True
    ):
        assert target.sum() in (10 * 16, 13 * 15) and not (target & ~mask).any()
        on = target[points[:, 1].astype(int), points[:, 0].astype(int)]
        assert labels.tolist() == [1, 1, 1, 0, 0] and on.tolist() == [True] * 3 + [False] * 2


def test_jittered_boxes_grow_within_their_bound_and_repeat_with_the_seed():
    mask = two_objects()
    settings = PromptSettings("box", per_image=6, box_jitter=0.1)
    first = draw_prompts(mask, settings, np.random.default_rng(5))
    again = draw_prompts(mask, settings, np.random.default_rng(5))
    other = draw_prompts(mask, settings, np.random.default_rng(6))
    assert np.array_equal(first["boxes"], again["boxes"])
    assert not np.array_equal(first["boxes"], other["boxes"])
    assert first["boxes"].shape == (6, 4)  # drawn again among the two objects
    for box, target in zip(first["boxes"], first["masks"], strict=True):
        rows, cols = np.nonzero(target)
        x0, y0, x1, y1 = box
        assert cols.min() - 0.1 * 50 <= x0 <= cols.min() and cols.max() <= x1 <= cols.max() + 5
        assert rows.min() - 0.1 * 40 <= y0 <= rows.min() and rows.max() <= y1 <= rows.max() + 4


def test_an_image_without_objects_is_prompted_on_its_background():
    drawn = draw_prompts(
        np.zeros((20, 20), bool), PromptSettings("points", points=2), np.random.default_rng(1)
    )
    assert not drawn["masks"].any() and (drawn["labels"] == 0).all()


def test_prompted_zero_shot_answers_as_metas_sam(meta_sam):
    """A box and two points per object, through the model's prompted path, give the masks
    Meta's ``Sam.forward`` gives for the same prompts on the same image."""
    model = cadsam.build_model("zero-shot", "vit_tiny").eval()
    randomize_(model.sam, seed=6)
    ref = meta_tiny_sam(meta_sam)
    ref.load_state_dict(model.sam.state_dict(), strict=True)
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(7)) * 255
    boxes = torch.tensor([[10.0, 12.0, 180.0, 240.0], [40.0, 8.0, 250.0, 100.0]])
    points = torch.tensor([[[60.0, 70.0], [20.0, 200.0]], [[100.0, 50.0], [200.0, 30.0]]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():
        expected = ref(
            [{"image": image, "original_size": (256, 256), "boxes": boxes,
              "point_coords": points, "point_labels": labels}],
            multimask_output=False,
        )[0]["masks"]  # fmt: skip
        prompts = Prompts(boxes[None], points[None], labels[None])
        ours = model(image[None], prompts=prompts)
    assert ours.shape == (1, 2, 256, 256)
    assert torch.equal(ours[0] > 0, expected[:, 0])


@pytest.fixture(scope="module")
def kvasir_run(tmp_path_factory):
    """cad trained on box prompts (one epoch, tiny) on the Kvasir sample."""
    out = tmp_path_factory.mktemp("prompted") / "run"
    argv = train_argv("cad", "vit_tiny", out, "--prompt", "box+points", "--val-fraction", "0.4")
    assert main(argv) == 0
    return out


def train_argv(method, backbone, out, *extra):
    return [
        "train", "--method", method, "--backbone", backbone, "--random-weights",
        "--images", str(KVASIR / "images"), "--masks", str(KVASIR / "masks"),
        "--out", str(out), "--epochs", "1", "--image-size", "64", "--batch-size", "2",
        "--num-workers", "0", "--no-progress", *extra,
    ]  # fmt: skip


def eval_json(run, capsys, *extra):
    data = ["--images", str(KVASIR / "images"), "--masks", str(KVASIR / "masks")]
    assert main(["eval", "--weights", str(run), *data, "--json", "--no-progress", *extra]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def test_prompted_training_records_its_prompt_and_eval_scores_each_object(kvasir_run, capsys):
    """The weights say which prompt they learnt; eval uses it by default, and scores each
    object (connected component) once, the same on every run."""
    lines = (kvasir_run / "metrics.jsonl").read_text().splitlines()
    assert "zero_shot" in lines[0] and "objects" in json.loads(lines[-1])["val"]
    meta = cadsam.weights.read_weights_metadata(kvasir_run / "last.safetensors")
    assert meta["prompt"] == "box+points"
    default = eval_json(kvasir_run, capsys)
    boxes = eval_json(kvasir_run, capsys, "--prompt", "box")
    again = eval_json(kvasir_run, capsys, "--prompt", "box")
    assert default["prompt"] == "box+points" and boxes["prompt"] == "box"
    assert boxes == again  # prompts drawn with a fixed seed
    assert boxes["objects"] >= 5  # each of the five images has an object at least
    whole = eval_json(kvasir_run, capsys, "--prompt", "whole")
    assert whole["prompt"] == "whole" and whole["images"] == 5


@pytest.mark.parametrize("backbone", ["vit_tiny", "sam2.1_hiera_tiny_test"])
def test_points_train_on_both_backbones(tmp_path, backbone):
    out = tmp_path / "run"
    assert main(train_argv("lora", backbone, out, "--prompt", "points")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(records[-1]["loss"])


@pytest.mark.parametrize("backbone", ["vit_tiny", "sam2.1_hiera_tiny_test"])
def test_prompted_training_from_the_cache(tmp_path, sam_file, backbone, capsys):
    """Prompts never touch the encoder: cad trains on them from a cache, and eval with points
    scores the same twice."""
    checkpoint = sam_file
    if backbone != "vit_tiny":
        from cadsam.sam2 import build_sam2

        checkpoint = tmp_path / "sam2.pt"
        torch.save({"model": build_sam2(backbone).state_dict()}, checkpoint)
    cache = tmp_path / "cache"
    assert main(["cache", "--backbone", backbone, "--checkpoint", str(checkpoint),
                 "--images", str(KVASIR / "images"), "--out", str(cache), "--image-size", "64",
                 "--no-progress"]) == 0  # fmt: skip
    run = tmp_path / "run"
    argv = train_argv("cad", backbone, run, "--prompt", "points", "--cache", str(cache))
    argv.remove("--random-weights")
    assert main([*argv, "--checkpoint", str(checkpoint)]) == 0
    capsys.readouterr()
    first, again = (eval_json(run, capsys, "--checkpoint", str(checkpoint)) for _ in range(2))
    assert first["prompt"] == "points" and first == again


def test_predict_a_box_and_points_on_real_images(kvasir_run, tmp_path):
    """--box/--point and a prompts file give the same mask, at the image's size; a box around
    a part of the image and one around another give different masks."""
    image = sorted((KVASIR / "images").iterdir())[0]
    width, height = Image.open(image).size
    box = f"{width // 4},{height // 4},{3 * width // 4},{3 * height // 4}"
    written = []
    for name, prompt in (
        ("flags", ["--box", box, "--point", f"{width // 2},{height // 2}"]),
        ("other", ["--box", f"0,0,{width // 5},{height // 5}"]),
    ):
        out = tmp_path / f"{name}.png"
        argv = ["predict", "--weights", str(kvasir_run), "--images", str(image), "--out", str(out)]
        assert main([*argv, *prompt, "--no-progress"]) == 0
        written.append(np.array(Image.open(out)))
    prompts = tmp_path / "prompts.json"
    given = {"box": [int(v) for v in box.split(",")], "points": [[width // 2, height // 2, 1]]}
    prompts.write_text(json.dumps({image.name: given}))
    out = tmp_path / "file.png"
    argv = ["predict", "--weights", str(kvasir_run), "--images", str(image), "--out", str(out)]
    assert main([*argv, "--prompts", str(prompts), "--no-progress"]) == 0
    assert written[0].shape == (height, width)
    np.testing.assert_array_equal(np.array(Image.open(out)), written[0])
    predictor = cadsam.load(kvasir_run, device="cpu")
    mask = predictor.predict(image, box=given["box"], points=[given["points"][0][:2]])
    np.testing.assert_array_equal(mask, written[0] > 0)
    prompts.write_text(json.dumps({image.name: [1, 2]}))
    assert main([*argv, "--prompts", str(prompts)]) == 1
    assert not np.array_equal(written[0], written[1])


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--prompt", "box", "--set", "cuda_graph=true"], "cuda_graph replays the whole-image"),
        (["--prompt", "box", "--set", "prompts_per_image=0"], "prompts_per_image must be"),
    ],
)
def test_prompt_mistakes_are_one_line(tmp_path, capsys, extra, said):
    assert main(train_argv("decoder", "vit_tiny", tmp_path / "run", *extra)) == 1
    assert said in capsys.readouterr().err


def test_coco_instances_are_prompted_one_by_one(tmp_path, capsys):
    """Two touching annotations form one connected component, but COCO says they are two
    objects: each is prompted and scored on its own; the same union drawn as a PNG mask is one."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    entries, annotations = [], []
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(tmp_path / f"images/{i}.png")
        entries.append({"id": i + 1, "file_name": f"{i}.png", "height": 40, "width": 48})
        union = np.zeros((40, 48), np.uint8)
        for x in (6, 18):  # columns 6..17 and 18..29: touching
            polygon = [x, 8, x + 12, 8, x + 12, 30, x, 30]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "segmentation": [polygon], "iscrowd": 0})  # fmt: skip
            union[8:30, x : x + 12] = 255
        Image.fromarray(union).save(tmp_path / f"masks/{i}.png")
    coco = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    counted = {}
    for source, extra in (("coco.json", ["--coco-category", "a"]), ("masks", [])):
        data = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / source), *extra]
        assert main(["eval", "--method", "zero-shot", "--backbone", "vit_tiny", "--random-weights",
                     *data, "--image-size", "48", "--prompt", "box", "--json"]) == 0  # fmt: skip
        counted[source] = json.loads(capsys.readouterr().out.splitlines()[-1])["objects"]
    assert counted == {"coco.json": 6, "masks": 3}
