"""Training, resume, multi-process training, evaluation and prediction from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import SHARED_DATA, join_as_rank
from PIL import Image
from safetensors.torch import load_file

from cadsam import build_model
from cadsam.commands import main
from cadsam.config import TrainConfig
from cadsam.errors import CadsamError
from cadsam.step import segmentation_loss
from cadsam.training import lr_factor, train

ISBI = SHARED_DATA / "isbi2012-membrane"
KVASIR = SHARED_DATA / "kvasir-seg-sample"
FAST = ["--backbone", "vit_tiny", "--image-size", "64", "--set", "num_workers=0", "--no-progress"]


def _isbi_subset(tmp_path, n=8):
    """A copy-free subset: symlinks to the first ``n`` real ISBI pairs."""
    for kind in ("images", "masks"):
        (tmp_path / kind).mkdir(exist_ok=True)
        for path in sorted((ISBI / kind).iterdir())[:n]:
            (tmp_path / kind / path.name).symlink_to(path.resolve())
    return ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")]


def test_loss_matches_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 4, generator=g)
    target = (torch.rand(3, 1, 5, 4, generator=g) > 0.5).float()
    x, t = logits.double(), target.double()
    p = 1 / (1 + torch.exp(-x))
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    inter = (p * t).sum((1, 2, 3))
    iou = 1 - (inter + 1e-3) / ((p + t).sum((1, 2, 3)) - inter + 1e-3)
    assert segmentation_loss(logits, target).item() == pytest.approx(
        (bce + iou.mean()).item(), rel=1e-5
    )


def test_learning_rate_schedules():
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert lr_factor("constant", 77, 100) == 1.0


@pytest.mark.parametrize("method", ["decoder", "cad"])
def test_a_few_steps_lower_the_loss_on_real_data(method):
    from cadsam.data import SegmentationDataset, collate, pair_folders

    pairs = pair_folders(ISBI / "images", ISBI / "masks")[:4]
    batch = collate([SegmentationDataset(pairs, size=64)[i] for i in range(4)])
    torch.manual_seed(0)
    model = build_model(method, "vit_tiny", **({"adapter_size": 64} if method == "cad" else {}))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-4, weight_decay=0.01)
    losses = []
    for _ in range(8):
        loss = segmentation_loss(model(batch["image"]), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def _run_cli(args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "cadsam", *args],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    data = _isbi_subset(tmp_path, 8)
    common = [
        "train",
        "--method",
        "cad",
        "--set",
        "adapter_size=32",
        "--epochs",
        "3",
        "--batch-size",
        "2",
        *FAST,
        *data,
    ]
    # Every run in its own single-threaded process: the same float reduction order everywhere,
    # so the resumed run can be compared exactly.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert _run_cli([*common, "--out", str(tmp_path / "whole")], env=env).returncode == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cadsam", *common, "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # somewhere in epoch 2 (or later): no clean shutdown
    proc.wait()
    finished = len((run / "metrics.jsonl").read_text().splitlines())
    assert 1 <= finished <= 3

    assert (
        _run_cli(["train", "--out", str(run), "--resume", "--no-progress"], env=env).returncode == 0
    )
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    whole, resumed = (
        load_file(tmp_path / "whole" / "last.safetensors"),
        load_file(run / "last.safetensors"),
    )
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.allclose(whole[key].float(), resumed[key].float(), atol=1e-6), key


def test_run_directory_protection_and_resume_conflicts(tmp_path, capsys):
    data = _isbi_subset(tmp_path, 2)
    args = [
        "train",
        "--method",
        "decoder",
        "--epochs",
        "1",
        *FAST,
        *data,
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    assert main(args) == 1
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", "--lr", "1"]) == 1
    assert "--lr 1.0 differs from the run's 0.0002" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err


def _ddp_worker(rank, world, port, cfg_kwargs, out):
    join_as_rank(rank, world, port)
    model = train(TrainConfig(**cfg_kwargs, out=str(out / f"run{rank}")))
    torch.save(model.trainable_state_dict(), out / f"rank{rank}.pt")


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    images = tmp_path / "data"
    images.mkdir()
    data = _isbi_subset(images, 8)
    cfg = dict(
        method="decoder",
        backbone="vit_tiny",
        images=data[1],
        masks=data[3],
        image_size=64,
        epochs=2,
        num_workers=0,
        progress=False,
        device="cpu",
    )
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, 29571, {**cfg, "batch_size": 2}, tmp_path), nprocs=2
    )
    single = train(
        TrainConfig(**cfg, batch_size=4, out=str(tmp_path / "single"))
    ).trainable_state_dict()
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(21)
    initial = build_model("decoder", "vit_tiny").trainable_state_dict()
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), key  # gradients were all-reduced
        # AdamW turns rounding noise in zero gradients (e.g. attention key biases, which
        # softmax ignores) into steps of up to lr = 2e-4: allow 5 % of one such step.
        assert torch.allclose(rank0[key], value, atol=1e-5, rtol=1e-4), key
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-4  # training did move the weights, well beyond the tolerance


def _train_cad_one_epoch(data: list[str], out) -> None:
    args = ["train", "--method", "cad", "--set", "adapter_size=32", "--epochs", "1", *FAST, *data]
    assert main([*args, "--out", str(out)]) == 0


def test_eval_and_predict_from_the_command_line(tmp_path, capsys):
    data = _isbi_subset(tmp_path, 4)
    _train_cad_one_epoch(data, tmp_path / "run")
    weights = str(tmp_path / "run" / "last.safetensors")
    capsys.readouterr()
    kvasir = ["--images", str(KVASIR / "images"), "--masks", str(KVASIR / "masks")]
    assert main(["eval", "--weights", weights, *kvasir, "--json", "--num-workers", "0"]) == 0
    at_train = json.loads(capsys.readouterr().out)
    assert at_train["images"] == 5 and 0 <= at_train["dice"] <= 1
    assert (
        main(
            [
                "eval",
                "--weights",
                weights,
                *kvasir,
                "--json",
                "--num-workers",
                "0",
                "--eval-resolution",
                "original",
            ]
        )
        == 0
    )
    original = json.loads(capsys.readouterr().out)
    assert original["images"] == 5 and original["dice"] != at_train["dice"]

    out = tmp_path / "masks"
    assert (
        main(
            [
                "predict",
                "--weights",
                weights,
                "--images",
                str(KVASIR / "images"),
                "--out",
                str(out),
                "--overlay",
                "--probabilities",
            ]
        )
        == 0
    )
    for image in (KVASIR / "images").iterdir():
        mask = Image.open(out / f"{image.stem}.png")
        assert mask.size == Image.open(image).size  # each image's own size
        assert set(np.unique(np.array(mask))) <= {0, 255}
        assert Image.open(out / f"{image.stem}_overlay.png").size == mask.size
        assert Image.open(out / f"{image.stem}_prob.png").mode == "L"


def test_weights_rebuild_the_trained_model_exactly(tmp_path):
    from cadsam.weights import load_weights

    data = _isbi_subset(tmp_path, 2)
    _train_cad_one_epoch(data, tmp_path / "run")
    model, meta = load_weights(tmp_path / "run" / "last.safetensors")
    assert (
        meta["method"] == "cad" and meta["options"]["adapter_size"] == 32 and meta["includes_base"]
    )
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["model"]
    for key, value in state.items():
        assert torch.equal(model.trainable_state_dict()[key], value), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "train",
                "--method",
                "cad",
                "--backbone",
                "vit_tiny",
                "--out",
                "{tmp}/r",
                "--images",
                "{tmp}/nope",
                "--masks",
                "{tmp}",
            ],
            "not a folder: ",
        ),
        (
            ["train", "--method", "cad", "--backbone", "vit_tiny", "--out", "{tmp}/r"],
            "give --images DIR --masks DIR",
        ),
        (
            [
                "train",
                "--method",
                "decoder",
                "--backbone",
                "vit_tiny",
                "--out",
                "{tmp}/r",
                "--dataset",
                "istd",
                "--data-root",
                "{tmp}",
            ],
            "istd train split: expected folder",
        ),
        (
            [
                "train",
                "--method",
                "decoder",
                "--backbone",
                "vit_tiny",
                "--out",
                "{tmp}/r",
                "--images",
                "{tmp}/img",
                "--masks",
                "{tmp}/gt",
            ],
            "a.png is 16x12 but mask",
        ),
        (["train", "--config", "{tmp}/missing.yaml"], "config file not found"),
        (
            [
                "eval",
                "--weights",
                "{tmp}/none.safetensors",
                "--images",
                "{tmp}/img",
                "--masks",
                "{tmp}/gt",
            ],
            "weights not found",
        ),
        (
            [
                "eval",
                "--method",
                "zero-shot",
                "--backbone",
                "vit_b",
                "--checkpoint",
                "{tmp}/x.pth",
                "--images",
                "{tmp}/img",
                "--masks",
                "{tmp}/gt",
            ],
            "checkpoint not found",
        ),
        (
            [
                "predict",
                "--weights",
                "{tmp}/img/a.png",
                "--images",
                "{tmp}/img",
                "--out",
                "{tmp}/o",
            ],
            "is not a cadsam weights file: not a safetensors file",
        ),
    ],
    ids=[
        "missing-dir",
        "no-data",
        "layout",
        "size-mismatch",
        "config",
        "weights",
        "checkpoint",
        "not-weights",
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, message):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "gt" / "a.png")
    result = _run_cli([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("cadsam: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_tensorboard_logs_what_metrics_jsonl_says(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _isbi_subset(tmp_path, 6)
    args = [
        "train",
        "--method",
        "decoder",
        "--epochs",
        "2",
        "--val-fraction",
        "0.34",
        "--set",
        "tensorboard=true",
    ]
    assert main([*args, *FAST, *data, "--out", str(tmp_path / "run")]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    baseline, *lines = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(events.Scalars("train/loss")) == 2 * 1  # 4 training pairs, batch 4: a step an epoch
    dice = [e.value for e in events.Scalars("val/dice")]
    assert dice == pytest.approx([x["val"]["dice"] for x in lines])
    zero_shot = [(e.step, e.value) for e in events.Scalars("zero_shot/dice")]
    assert zero_shot == [(0, pytest.approx(baseline["val_dice"]))]


def test_predict_feeds_the_model_what_training_and_eval_feed_it():
    from cadsam.data import SegmentationDataset, pair_folders
    from cadsam.data.io import read_image
    from cadsam.prediction import predict_logits

    torch.manual_seed(0)
    model = build_model("cad", "vit_tiny", adapter_size=32).eval()
    pair = pair_folders(KVASIR / "images", KVASIR / "masks")[0]
    image = read_image(pair.image)
    with torch.no_grad():
        from_dataset = model(SegmentationDataset([pair], 64)[0]["image"][None].float())
    expected = torch.nn.functional.interpolate(
        from_dataset, image.shape[:2], mode="bilinear", align_corners=False
    )[0, 0]
    assert torch.equal(predict_logits(model, image, 64, torch.device("cpu")), expected)


def _config_of(monkeypatch, tmp_path, *flags):
    """The TrainConfig that ``cadsam train`` would train, for these flags."""
    seen = {}
    monkeypatch.setattr("cadsam.training.train", lambda config: seen.setdefault("config", config))
    args = ["train", "--method", "cad", "--backbone", "vit_tiny", "--out", str(tmp_path)]
    assert main([*args, "--images", "i", "--masks", "m", *flags]) == 0
    return seen["config"]


def test_each_setting_reaches_its_place(monkeypatch, tmp_path):
    """--set sends a model option to the model, a runtime setting to the runtime and a
    training setting to the run; --runtime names the runtime. Nothing is dropped."""
    config = _config_of(
        monkeypatch,
        tmp_path,
        *("--set", "adapter_size=32", "--set", "adapter-tile-mib=16", "--runtime", "lean"),
        *("--set", "checkpoint_adapter=true", "--set", "encoder_chunk=2"),
        *("--set", "compile_decoder=false", "--set", "grad_accum=2", "--no-augment"),
    )
    assert config.options == {"adapter_size": 32}
    assert config.runtime == {
        "name": "lean",
        "adapter_tile_mib": 16,
        "checkpoint_adapter": True,
        "encoder_chunk": 2,
        "compile_decoder": False,
    }
    assert config.grad_accum == 2 and config.augment is False


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "compile_tiles=maybe"], "compile_tiles must be auto, true or false"),
        (["--set", "encoder_chunk=-1"], "encoder_chunk must be a number >= 0"),
        (["--set", "warp_speed=9"], "--set warp_speed: no such setting"),
        (["--set", "adapter_tile_mib"], "--set takes NAME=VALUE"),
        (["--set", "cad_layout=fancy"], "cad_layout must be one of"),
        (["--runtime", "lean", "--set", "compile_blocks=true"], "does not combine"),
        (["--set", "grad_accum=0"], "grad_accum must be at least 1, got 0"),
        (["--set", "schedule=linear"], "schedule must be one of cosine, constant"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, tmp_path, flags, message):
    args = ["train", "--method", "cad", "--backbone", "vit_tiny", "--out", str(tmp_path)]
    assert main([*args, "--images", "i", "--masks", "m", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_option_the_method_does_not_take_is_an_error(capsys, tmp_path):
    args = ["train", "--method", "decoder", "--backbone", "vit_tiny", "--out", str(tmp_path)]
    assert main([*args, "--images", "i", "--masks", "m", "--set", "adapter_size=256"]) == 1
    assert "method decoder does not take adapter_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "flags", "message"),
    [
        ("decoder", ["--set", "adapter_tile_mib=8"], "adapter_tile_mib acts on CAD's adapter"),
        ("lora", ["--set", "channels_last=true"], "which method lora does not have"),
        ("cad", ["--set", "checkpoint_encoder=true"], "(it is for: sam-adapter, sam-adapter-paper, lora)"),
        ("lora", ["--cache", "c"], "lora acts inside the image encoder, so it cannot train from"),
    ],
)  # fmt: skip
def test_what_the_method_cannot_use_is_an_error_before_the_data(
    capsys, tmp_path, method, flags, message
):
    """Images "i" do not exist: the error comes before they are looked for."""
    args = ["train", "--method", method, "--backbone", "vit_tiny", "--out", str(tmp_path / "r")]
    assert main([*args, "--images", "i", "--masks", "m", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_an_old_configs_method_options_split_into_options_and_runtime(tmp_path):
    """Before model and runtime options were told apart, both were ``method_options``."""
    old = {"method": "sam-adapter", "backbone": "vit_tiny", "out": "r", "images": "i", "masks": "m"}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({**old, "method_options": {"checkpoint_blocks": True}}))
    config = TrainConfig.from_sources(str(path), {})
    assert config.runtime == {"name": "auto", "checkpoint_encoder": True} and config.options == {}
    old = {
        **old,
        "method": "decoder",
        "method_options": {"adapter_size": 256, "compile_decoder": False},
    }
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(CadsamError, match="method decoder does not take adapter_size"):
        TrainConfig.from_sources(str(path), {})


def test_every_training_setting_is_reached_once_and_help_stays_short():
    """A flag, or --set NAME=VALUE (the epilogue lists those): each TrainConfig key is one of
    them, never both; and train --help shows at most 36 flags (31 before several classes, label
    formats and prompts, each of which a user of them needs to see)."""
    import argparse
    import dataclasses

    from cadsam.commands.train import SET_ONLY_TRAINING
    from cadsam.commands.train import add_arguments as add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len({flag.dest for flag in flags}) <= 36
    by_flag = {flag.dest for flag in flags} - {"config", "runtime_name", "overrides"}
    keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"options", "runtime"}
    assert by_flag | set(SET_ONLY_TRAINING) == keys
    assert not by_flag & set(SET_ONLY_TRAINING)
    for name in SET_ONLY_TRAINING:
        assert name in parser.epilog
