"""cadsam reproduce end to end on a tiny synthetic stand-in for ISTD."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from cadsam.commands import main
from cadsam.data.synthetic import make_synthetic_set
from cadsam.sam import build_sam


@pytest.fixture()
def istd_like(tmp_path):
    """Synthetic images laid out as ISTD, and a checkpoint folder with a random vit_tiny."""
    made = make_synthetic_set(tmp_path / "made", n_train=4, n_test=4, size=64, seed=1)
    for split, a, b in (("train", "train_A", "train_B"), ("test", "test_A", "test_B")):
        shutil.copytree(made / split / "images", tmp_path / "data" / "ISTD" / split / a)
        shutil.copytree(made / split / "masks", tmp_path / "data" / "ISTD" / split / b)
    (tmp_path / "ckpt").mkdir()
    torch.save(build_sam("vit_tiny").state_dict(), tmp_path / "ckpt" / "sam_vit_tiny.pth")
    return tmp_path


def _reproduce(root) -> list[str]:
    return [
        "reproduce",
        "--data-root",
        str(root / "data"),
        "--checkpoint-dir",
        str(root / "ckpt"),
        "--out",
        str(root / "out"),
    ]


def test_reproduce_writes_every_table_and_figure(istd_like, capsys):
    args = [*_reproduce(istd_like), "--datasets", "istd", "--backbones", "vit_tiny"]
    args += ["--methods", "zero-shot", "decoder", "cad", "--epochs", "1", "--image-size", "64"]
    args += ["--adapter-size", "32", "--num-workers", "0", "--no-progress"]
    code, said = main(args), capsys.readouterr()
    # once, on 14 workers with a GPU visible, a run logged nothing and wrote no weights, as a
    # process that is not torchrun's rank 0 would: say which
    launch = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    assert code == 0, (said, launch, torch.distributed.is_initialized())
    out = istd_like / "out"
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["zero-shot", "decoder", "cad"]
    rows = list(csv.DictReader((out / "tables.csv").read_text().splitlines()))
    table = (out / "tables.md").read_text()
    for r, row in zip(results, rows, strict=True):
        assert (row["method"], row["dice"], row["iou"]) == (
            r["method"],
            f"{r['dice']:.4f}",
            f"{r['iou']:.4f}",
        )
        assert f"{r['dice']:.4f}" in table
    assert "| cad | 5,831,908 |" in table and "Table 3" in table
    # each trained method against zero-shot's test Dice: in the report, and warned where not better
    start = results[0]["dice"]
    worse = [r for r in results[1:] if r["dice"] < start + 1e-4]
    lines = [
        f"istd vit_tiny {r['method']}: test Dice {r['dice']:.4f}, not better than zero-shot "
        f"SAM's {start:.4f}"
        for r in worse
    ]
    assert [x for x in said.err.splitlines() if "zero-shot" in x] == [
        f"cadsam: warning: {line}" for line in lines
    ]
    if worse:
        assert "\n".join(f"- {line}" for line in lines) in table
    else:
        assert "Every trained run scores a higher test Dice than zero-shot SAM" in table
    assert Image.open(out / "fig6_vit_tiny.png").size[0] > 0
    grid = Image.open(out / "fig8_examples.png")
    width, height = grid.size
    assert width == 256 * (2 + 3)  # image, truth, 3 runs
    assert 0 < height - 256 * 2 < 64  # 2 examples under a strip of column labels
    assert main(args) == 0  # a rerun skips what is done
    assert capsys.readouterr().out.count("done, skipped") == 3


def test_missing_inputs_are_reported_before_training(istd_like, capsys):
    args = [
        *_reproduce(istd_like),
        "--datasets",
        "istd",
        "camo",
        "--backbones",
        "vit_tiny",
        "vit_b",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "camo train split: expected folder" in err and "vit_b checkpoint missing" in err
    assert not (istd_like / "out").exists()


def test_reproduce_refuses_torchrun_before_any_work(istd_like, capsys, monkeypatch):
    """Under torchrun every process would run every training, and only rank 0 writes weights."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*_reproduce(istd_like), "--datasets", "istd", "--backbones", "vit_tiny"]) == 1
    assert "not under torchrun" in capsys.readouterr().err
    assert not (istd_like / "out").exists()


def test_an_adapter_size_without_cad_is_an_error(istd_like, capsys):
    args = [*_reproduce(istd_like), "--methods", "decoder", "--adapter-size", "256"]
    assert main(args) == 1
    assert "--adapter-size is CAD's adapter input, and --methods names no cad" in (
        capsys.readouterr().err
    )
    assert not (istd_like / "out").exists()


def test_the_summary_names_each_trained_run_not_better_than_zero_shot():
    from cadsam.commands.reproduce import not_better_than_zero_shot

    def result(dataset, backbone, method, dice):
        return {"dataset": dataset, "backbone": backbone, "method": method, "dice": dice}

    results = [
        result("istd", "vit_b", "zero-shot", 0.6),
        result("istd", "vit_b", "decoder", 0.7),
        result("istd", "vit_b", "cad", 0.6),  # equal: not better
        result("camo", "vit_b", "zero-shot", 0.4),
        result("camo", "vit_b", "lora", 0.3),
        result("istd", "vit_h", "cad", 0.1),  # no zero-shot on vit_h: nothing to compare
    ]
    assert not_better_than_zero_shot(results) == [
        "istd vit_b cad: test Dice 0.6000, not better than zero-shot SAM's 0.6000",
        "camo vit_b lora: test Dice 0.3000, not better than zero-shot SAM's 0.4000",
    ]
