"""Several classes: the decoder's class tokens, the loss, and train / eval / predict / cache on
the CamVid sample (11 classes, ignore value 11) with the tiny backbones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

import cadsam
from cadsam.cache import open_cache
from cadsam.commands import main
from cadsam.data.io import read_image
from cadsam.data.labels import IGNORE, class_table
from cadsam.data.transforms import resize_image
from cadsam.step import class_loss

CAMVID = SHARED_DATA / "camvid-sample"
NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car"]
NAMES += ["pedestrian", "bicyclist"]
SIZE = 64


def token_parameters(width: int = 256) -> int:
    """One class token and its hypernetwork MLP (width -> width -> width -> width / 8)."""
    return width + 2 * (width * width + width) + width * (width // 8) + width // 8


@pytest.mark.parametrize("backbone", ["vit_tiny", "sam2.1_hiera_tiny_test"])
def test_class_tokens_start_as_sams_own(backbone):
    """Class k starts as SAM's mask token k mod 4. With 4 classes the decoder's tokens are
    SAM's own, so class 0 answers as the binary task's single mask does; with 6, classes 4 and
    5 are copies of 0 and 1 (the tokens attend to each other, so 0 itself then differs)."""
    models = []
    for classes in (None, class_table(4), class_table(6)):
        torch.manual_seed(0)  # the same SAM each time
        models.append(cadsam.build_model("decoder", backbone, classes=classes).eval())
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        one, four, six = (model(images) for model in models)
    assert [x.shape[1] for x in (one, four, six)] == [1, 4, 6]
    torch.testing.assert_close(four[:, 0], one[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(six[:, 4], six[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(six[:, 5], six[:, 1], rtol=1e-4, atol=1e-5)
    assert (six[:, 1] - six[:, 0]).abs().max() > 1e-3  # SAM's other tokens: other masks


def test_class_tokens_are_the_trainable_difference():
    """cadsam params --classes 12: SAM's decoder has 4 mask tokens, so 8 more, each a token
    and its hypernetwork MLP, counted by hand."""
    counts = {}
    for classes in ("", "12"):
        out = main_json(["params", "--backbone", "vit_b", "--method", "cad", "--json"], classes)
        counts[classes] = out["trainable"]
    assert counts["12"] - counts[""] == 8 * token_parameters()


def main_json(argv: list[str], classes: str) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(argv + (["--classes", classes] if classes else []))
    return json.loads(buffer.getvalue().splitlines()[-1])


def test_class_loss_equals_a_float64_reference():
    """Cross-entropy over the pixels not ignored, plus 1 - Dice per class present in the batch
    (softmax probabilities), averaged over those classes: computed pixel by pixel."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=generator)
    target = torch.randint(0, 3, (2, 5, 6), generator=generator)  # class 3 absent
    target[0, :2] = IGNORE
    target[1, 4, :] = IGNORE
    prob = torch.softmax(logits.double(), 1).numpy()
    t = target.numpy()
    valid = [(b, y, x) for b in range(2) for y in range(5) for x in range(6) if t[b, y, x] >= 0]
    ce = -np.mean([np.log(prob[b, t[b, y, x], y, x]) for b, y, x in valid])
    dice_terms = []
    for k in range(4):
        inter = sum(prob[b, k, y, x] * (t[b, y, x] == k) for b, y, x in valid)
        p_sum = sum(prob[b, k, y, x] for b, y, x in valid)
        g_sum = sum(float(t[b, y, x] == k) for b, y, x in valid)
        if g_sum > 0:
            dice_terms.append(1 - (2 * inter + 1e-3) / (p_sum + g_sum + 1e-3))
    expected = ce + np.mean(dice_terms)
    assert len(dice_terms) == 3
    assert class_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_class_loss_of_a_batch_wholly_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = class_loss(logits, torch.full((1, 4, 4), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    """Four training and two validation pairs of the sample (links), and its class file."""
    root = tmp_path_factory.mktemp("camvid")
    for split, count in (("train", 4), ("val", 2)):
        for part in ("images", "labels"):
            folder = root / split / part
            folder.mkdir(parents=True)
            for path in sorted((CAMVID / split / part).iterdir())[:count]:
                (folder / path.name).symlink_to(path)
    (root / "classes.yaml").write_text(json.dumps({"classes": NAMES, "ignore_index": 11}))
    return root


def train_args(camvid, out, method, backbone="vit_tiny", *extra):
    return [
        "train", "--method", method, "--backbone", backbone, "--random-weights",
        "--images", str(camvid / "train/images"), "--masks", str(camvid / "train/labels"),
        "--val-images", str(camvid / "val/images"), "--val-masks", str(camvid / "val/labels"),
        "--classes", str(camvid / "classes.yaml"), "--out", str(out), "--epochs", "1",
        "--image-size", str(SIZE), "--batch-size", "2", "--num-workers", "0", "--no-progress",
        *extra,
    ]  # fmt: skip


def confusion_scores(predicted: list[np.ndarray], truth: list[np.ndarray], k: int) -> dict:
    """mIoU, mDice (over classes present in the truth) and pixel accuracy, from a confusion
    matrix of numpy label maps; the truth's value 11 is ignored."""
    matrix = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(predicted, truth, strict=True):
        keep = t != 11
        np.add.at(matrix, (t[keep].astype(int), p[keep].astype(int)), 1)
    tp = np.diag(matrix).astype(float)
    fp, fn = matrix.sum(0) - tp, matrix.sum(1) - tp
    present = matrix.sum(1) > 0
    return {
        "miou": float(np.mean((tp / (tp + fp + fn))[present])),
        "mdice": float(np.mean((2 * tp / (2 * tp + fp + fn))[present])),
        "pixel_accuracy": float(tp.sum() / matrix.sum()),
    }


@pytest.mark.parametrize("method", ["decoder", "cad", "lora"])
def test_camvid_train_eval_predict(camvid, tmp_path, capsys, method):
    """Train a few steps, then: eval's per-class table names every class; predict writes label
    maps at 480 x 360 whose values are class indices; eval at the original resolution equals
    a confusion matrix of those label maps against the ground truth."""
    run = tmp_path / "run"
    main(train_args(camvid, run, method))
    logged = capsys.readouterr().out
    assert "val mdice" in logged and "zero-shot" not in logged
    meta = cadsam.weights.read_weights_metadata(run / "last.safetensors")
    assert meta["classes"] == {"names": NAMES, "ignore_index": 11}

    data = ["--images", str(camvid / "val/images"), "--masks", str(camvid / "val/labels")]
    main(["eval", "--weights", str(run), *data, "--no-progress"])
    table = capsys.readouterr().out
    assert all(name in table for name in NAMES) and "mIoU" in table
    main(["eval", "--weights", str(run), *data, "--eval-resolution", "original", "--json"])
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert list(scores["per_class"]) == NAMES

    out = tmp_path / "masks"
    main([
        "predict", "--weights", str(run), "--images", str(camvid / "val/images"),
        "--out", str(out), "--probabilities", "--no-progress",
    ])  # fmt: skip
    predicted, truth = [], []
    for label in sorted((camvid / "val/labels").iterdir()):
        written = Image.open(out / f"{label.stem}.png")
        assert written.size == (480, 360) and written.mode == "L"
        predicted.append(np.array(written))
        truth.append(np.array(Image.open(label)))
        prob = np.load(out / f"{label.stem}_prob.npy")
        assert prob.shape == (11, 360, 480)
        np.testing.assert_array_equal(prob.argmax(0), predicted[-1])
    assert max(p.max() for p in predicted) < 11
    expected = confusion_scores(predicted, truth, 11)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key

    predictor = cadsam.load(run, device="cpu")
    assert predictor.classes.names == tuple(NAMES)
    image = camvid / "val/images" / f"{label.stem}.png"
    np.testing.assert_array_equal(predictor.predict(image), predicted[-1])


def test_camvid_from_the_cache(camvid, tmp_path, sam_file, capsys):
    """cad trains on K classes from an embedding cache as from the images: the cache is the
    binary task's, unchanged; the model's logits from cached rows equal those from the
    encoder (float16 rows)."""
    cache = tmp_path / "cache"
    main([
        "cache", "--backbone", "vit_tiny", "--checkpoint", str(sam_file),
        "--images", str(camvid / "train/images"), "--out", str(cache),
        "--image-size", str(SIZE), "--no-progress",
    ])  # fmt: skip
    run = tmp_path / "run"
    args = train_args(camvid, run, "cad", "vit_tiny", "--cache", str(cache), "--no-augment")
    args.remove("--random-weights")
    for flag in ("--val-images", "--val-masks"):  # validation from the cached pairs
        del args[args.index(flag) : args.index(flag) + 2]
    assert main([*args, "--checkpoint", str(sam_file), "--val-fraction", "0.25"]) == 0
    assert "val mdice" in capsys.readouterr().out
    model, _ = cadsam.weights.load_weights(run / "last.safetensors")
    model.eval()
    opened = open_cache(cache)
    path = sorted((camvid / "train/images").iterdir())[0]
    row = opened.manifest["ids"].index(path.stem) * len(opened.views)
    row += opened.views.index("identity")
    x = torch.from_numpy(resize_image(read_image(path), SIZE)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        direct = model(x)
        cached = model(x, torch.from_numpy(np.array(opened.embeddings[row], np.float32))[None])
    assert direct.shape == (1, 11, SIZE, SIZE)
    assert (direct - cached).abs().max() < 2e-2 * direct.abs().max()


def test_sam2_classes_train_and_predict(camvid, tmp_path):
    """SAM 2.1: lora on K classes trains and predicts label maps at the images' size."""
    run, out = tmp_path / "run", tmp_path / "masks"
    main(train_args(camvid, run, "lora", "sam2.1_hiera_tiny_test"))
    main([
        "predict", "--weights", str(run), "--images", str(camvid / "val/images"),
        "--out", str(out), "--overlay", "--no-progress",
    ])  # fmt: skip
    label = sorted((camvid / "val/labels").iterdir())[0]
    written = np.array(Image.open(out / f"{label.stem}.png"))
    assert written.shape == (360, 480) and written.max() < 11
    overlay = Image.open(out / f"{label.stem}_overlay.png")
    assert overlay.size[0] == 480 and overlay.size[1] > 360  # the legend below


def test_a_value_of_no_class_is_one_line_naming_file_and_value(camvid, tmp_path, capsys):
    """A label map holding 12 (neither a class nor the ignore value 11): train stops before
    any work, naming the file and the value; --skip-bad leaves the pair out and says so."""
    bad = tmp_path / "data"
    for part in ("images", "labels"):
        (bad / part).mkdir(parents=True)
        for path in sorted((camvid / "train" / part).iterdir()):
            (bad / part / path.name).symlink_to(path.resolve())
    victim = sorted((bad / "labels").iterdir())[1]
    labels = np.array(Image.open(victim))
    victim.unlink()
    labels[5, 7] = 12
    Image.fromarray(labels).save(victim)
    args = train_args(camvid, tmp_path / "run", "decoder")
    args[args.index("--images") + 1] = str(bad / "images")
    args[args.index("--masks") + 1] = str(bad / "labels")
    assert main(args) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(victim) in error and "value 12" in error
    assert not (tmp_path / "run").exists()
    assert main([*args, "--skip-bad"]) == 0
    assert "skipped 1 unreadable" in capsys.readouterr().out


def test_ignore_index_needs_classes(tmp_path, capsys):
    argv = [
        "train", "--method", "decoder", "--backbone", "vit_tiny", "--random-weights",
        "--images", str(tmp_path), "--masks", str(tmp_path), "--out", str(tmp_path / "r"),
        "--ignore-index", "11",
    ]  # fmt: skip
    assert main(argv) == 1
    assert "--ignore-index is for label maps: give --classes too" in capsys.readouterr().err


def write_coco(folder):
    """Three 40 x 48 images, each with a rectangle of category "a" and one of "b" (polygons)."""
    (folder / "images").mkdir(parents=True)
    entries, annotations = [], []
    for i in range(3):
        pixels = np.full((40, 48, 3), 40 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"im{i}.png")
        entries.append({"id": i + 1, "file_name": f"im{i}.png", "height": 40, "width": 48})
        for category, (x, y) in ((1, (4 + i, 5)), (2, (26, 18 + i))):
            box = [x, y, x + 12, y, x + 12, y + 10, x, y + 10]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                "segmentation": [box], "area": 120.0, "bbox": [x, y, 12, 10], "iscrowd": 0,
            })  # fmt: skip
    coco = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    (folder / "coco.json").write_text(json.dumps(coco))
    return folder


@pytest.mark.parametrize("task", ["binary", "classes"])
def test_coco_json_masks_train_and_evaluate(tmp_path, capsys, task):
    """--masks a COCO JSON file: the binary task segments the --coco-category; with a class
    file (background, a, b), every category is a class. Eval reads the same file."""
    data = write_coco(tmp_path / "data")
    if task == "binary":
        extra = ["--coco-category", "b"]
    else:
        (tmp_path / "classes.yaml").write_text("classes: [background, a, b]\n")
        extra = ["--classes", str(tmp_path / "classes.yaml")]
    pairs = ["--images", str(data / "images"), "--masks", str(data / "coco.json")]
    argv = [
        "train", "--method", "decoder", "--backbone", "vit_tiny", "--random-weights",
        *pairs, *extra, "--out", str(tmp_path / "run"), "--epochs", "1", "--image-size", "32",
        "--num-workers", "0", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    extra = extra if task == "binary" else []  # the weights hold the classes
    at_size = ["--eval-resolution", "original", "--json"]
    assert main(["eval", "--weights", str(tmp_path / "run"), *pairs, *extra, *at_size]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert scores["images"] == 3
    if task == "classes":
        assert list(scores["per_class"]) == ["background", "a", "b"]
        assert [scores["per_class"][k]["pixels"] for k in ("a", "b")] == [3 * 120, 3 * 120]


def test_coco_json_binary_needs_a_category(tmp_path, capsys):
    data = write_coco(tmp_path / "data")
    argv = [
        "train", "--method", "decoder", "--backbone", "vit_tiny", "--random-weights",
        "--images", str(data / "images"), "--masks", str(data / "coco.json"),
        "--out", str(tmp_path / "run"), "--image-size", "32",
    ]  # fmt: skip
    assert main(argv) == 1
    assert "--coco-category NAME" in capsys.readouterr().err


def write_tiff_pairs(folder, count=3):
    """Five-channel 16-bit TIFF images (channel 4 holds the object) and their binary masks."""
    import tifffile

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        stack = rng.integers(0, 1000, (40, 48, 5)).astype(np.uint16)
        mask = np.zeros((40, 48), bool)
        mask[8 + i : 24 + i, 10:30] = True
        stack[..., 4][mask] += 30000
        tifffile.imwrite(folder / "images" / f"t{i}.tif", stack, photometric="minisblack")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"t{i}.png")
    return folder


def test_image_channels_are_read_as_trained_and_cached(tmp_path, sam_file, capsys):
    """--image-channels 4,0,2 picks the model's RGB from five-channel TIFFs: recorded with the
    weights, so predict and cadsam.load read the same channels; a cache made from other
    channels does not fit the run."""
    data = write_tiff_pairs(tmp_path / "data")
    pairs = ["--images", str(data / "images"), "--masks", str(data / "masks")]
    common = [
        "--backbone", "vit_tiny", "--checkpoint", str(sam_file), "--image-size", "32",
        "--no-progress",
    ]  # fmt: skip
    argv = ["train", "--method", "decoder", *common, *pairs, "--epochs", "1"]
    assert main([*argv, "--image-channels", "4,0,2", "--out", str(tmp_path / "run")]) == 0
    meta = cadsam.weights.read_weights_metadata(tmp_path / "run" / "last.safetensors")
    assert meta["image_channels"] == [4, 0, 2]

    predictor = cadsam.load(tmp_path / "run", device="cpu")
    path = data / "images" / "t0.tif"
    from cadsam.prediction import predict_logits

    chosen = predict_logits(predictor.model, read_image(path, (4, 0, 2)), 32, torch.device("cpu"))
    first = predict_logits(predictor.model, read_image(path), 32, torch.device("cpu"))
    assert not torch.equal(chosen, first)  # the channels matter to the model
    np.testing.assert_array_equal(predictor.predict(path), (chosen > 0).numpy())
    out = tmp_path / "masks"
    argv_predict = ["predict", "--weights", str(tmp_path / "run"), "--images", str(path)]
    assert main([*argv_predict, "--out", str(out), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.array(Image.open(out / "t0.png")) > 0, (chosen > 0).numpy())

    cache = tmp_path / "cache"
    assert main(["cache", *common, "--images", str(data / "images"), "--out", str(cache)]) == 0
    capsys.readouterr()
    cached = [*argv, "--cache", str(cache), "--out", str(tmp_path / "cached")]
    assert main([*cached, "--image-channels", "4,0,2"]) == 1
    assert "image_channels: cache has None, wanted [4, 0, 2]" in capsys.readouterr().err
