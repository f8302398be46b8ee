"""The zero-shot baseline of a training run: scored before the first epoch, recorded in
metrics.jsonl, and a warning where the fine-tune ends no better than it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cadsam.commands import main
from cadsam.data.synthetic import make_synthetic_set
from cadsam.sam import build_sam
from cadsam.training import zero_shot_warning

SIZE = "64"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, data flags, checkpoint file): synthetic train and validation pairs (their
    images also together in all/images, for one cache), and vit_tiny's random weights as a
    file, so that train, cache and eval share them."""
    root = tmp_path_factory.mktemp("zero-shot")
    made = make_synthetic_set(root / "made", n_train=4, n_test=3, size=64, seed=3)
    for split, prefix, target in (("train", "t", "train"), ("test", "v", "val")):
        for kind in ("images", "masks"):
            for path in sorted((made / split / kind).iterdir()):
                for folder in (root / target / kind, root / "all" / kind):
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, folder / f"{prefix}_{path.name}")
    data = ["--images", root / "train" / "images", "--masks", root / "train" / "masks"]
    data += ["--val-images", root / "val" / "images", "--val-masks", root / "val" / "masks"]
    torch.manual_seed(5)
    checkpoint = root / "sam_vit_tiny.pth"
    torch.save(build_sam("vit_tiny").state_dict(), checkpoint)
    return root, [str(a) for a in data], str(checkpoint)


def _cadsam(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _train(setup, out, *extra):
    _, data, checkpoint = setup
    return [
        "train", *data, "--backbone", "vit_tiny", "--checkpoint", checkpoint,
        "--image-size", SIZE, "--batch-size", "2", "--set", "num_workers=0", "--no-progress",
        "--out", out, *extra,
    ]  # fmt: skip


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def zero_shot_eval(setup):
    """``cadsam eval --method zero-shot --json`` on the validation pairs, same weights."""
    _, data, checkpoint = setup
    val = ["--images", data[data.index("--val-images") + 1]]
    val += ["--masks", data[data.index("--val-masks") + 1]]
    argv = ["eval", "--method", "zero-shot", "--backbone", "vit_tiny", "--checkpoint", checkpoint]
    argv += [*val, "--image-size", SIZE, "--num-workers", "0", "--json", "--no-progress"]
    return argv


@pytest.mark.parametrize("cached", [False, True], ids=["encoder", "cache"])
def test_a_run_with_validation_scores_zero_shot_first(setup, zero_shot_eval, cached, capsys):
    """CAD (whose adapter changes the embedding from the first step) records, before its first
    epoch, what zero-shot SAM scores on the validation pairs: eval's numbers, whether the
    embeddings come from the encoder or from the cache."""
    root, _, checkpoint = setup
    extra = ["--method", "cad", "--set", "adapter_size=32", "--epochs", "1"]
    if cached:
        build = ["cache", "--backbone", "vit_tiny", "--checkpoint", checkpoint, "--images"]
        build += [root / "all" / "images", "--out", root / "cache", "--image-size", SIZE]
        build += ["--dtype", "float32", "--num-workers", "0", "--no-progress"]
        assert _cadsam(build, capsys)[0] == 0
        extra += ["--cache", root / "cache"]
    run = root / f"cad-{'cache' if cached else 'encoder'}"
    code, out, err = _cadsam(_train(setup, run, *extra), capsys)
    assert code == 0, err
    baseline, *epochs = _metrics(run)
    assert set(baseline) == {"epoch", "zero_shot", "val_dice", "val_iou"}
    assert baseline["epoch"] == 0 and baseline["zero_shot"] is True
    assert [e["epoch"] for e in epochs] == [1] and "val" in epochs[0]
    said = [line for line in out.splitlines() if line.startswith("zero-shot SAM before training")]
    assert said == [
        f"zero-shot SAM before training: val dice {baseline['val_dice']:.4f} "
        f"iou {baseline['val_iou']:.4f} (the score to beat)"
    ]
    assert out.index("zero-shot SAM before training") < out.index("epoch 1:")
    code, out, err = _cadsam(zero_shot_eval, capsys)
    assert code == 0, err
    scored = json.loads(out)
    assert baseline["val_dice"] == pytest.approx(scored["dice"], rel=1e-5, abs=1e-6)
    assert baseline["val_iou"] == pytest.approx(scored["iou"], rel=1e-5, abs=1e-6)


def test_a_run_at_learning_rate_0_warns_and_a_resume_keeps_its_baseline(setup, capsys):
    """The decoder at --lr 0 stays zero-shot SAM exactly: its best epoch is not better, which
    train says at the end. Resumed and trained longer, the run keeps the baseline it started
    with (not scored again) and says so again."""
    root, _, _ = setup
    run = root / "lr0"
    code, out, err = _cadsam(
        _train(setup, run, "--method", "decoder", "--lr", "0", "--epochs", "1"), capsys
    )
    assert code == 0, err
    baseline, epoch = _metrics(run)
    assert epoch["val"]["dice"] == baseline["val_dice"]
    warning = (
        f"cadsam: warning: the best epoch (1, best.safetensors) has validation Dice "
        f"{baseline['val_dice']:.4f}, not better than zero-shot SAM's "
        f"{baseline['val_dice']:.4f} before training: the fine-tune did not improve on the "
        "model it started from; try another --lr, more epochs or more data, or use zero-shot "
        "(cadsam eval --method zero-shot)"
    )
    assert [line for line in err.splitlines() if "zero-shot" in line] == [warning]
    code, out, err = _cadsam(["train", "--out", run, "--resume", "--epochs", "2"], capsys)
    assert code == 0, err
    assert "zero-shot SAM before training" not in out
    lines = _metrics(run)
    assert lines[0] == baseline and [x["epoch"] for x in lines] == [0, 1, 2]
    assert [line for line in err.splitlines() if "zero-shot" in line] == [warning]


def test_the_warning_compares_the_best_epoch_with_zero_shot(tmp_path):
    assert zero_shot_warning(tmp_path) is None  # no metrics.jsonl

    def write(*dice, baseline=0.5):
        lines = [{"epoch": 0, "zero_shot": True, "val_dice": baseline, "val_iou": 0.3}]
        lines = lines if baseline is not None else []
        lines += [{"epoch": i + 1, "loss": 1.0, "val": {"dice": d}} for i, d in enumerate(dice)]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return zero_shot_warning(tmp_path)

    assert write(0.4, 0.6, 0.55) is None  # epoch 2 beats it
    assert write(0.6, baseline=None) is None  # no baseline: nothing to compare
    assert write(0.50005).startswith(  # a gain below the last digit shown is no gain
        "warning: the best epoch (1, best.safetensors) has validation Dice 0.5000, not "
        "better than zero-shot SAM's 0.5000 before training"
    )
    assert "the best epoch (2, best.safetensors) has validation Dice 0.4500," in write(0.3, 0.45)
