"""``auto`` weighs the job's size: it compiles and captures only where the images to process
repay the warm-up. The settling is a pure function of the runtime, the device type and the
job's size, tested here directly; a CUDA device is stood in for where the whole resolution
runs. The thresholds are checked against the measured figures worked by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import cadsam.fast.runtime as runtime_module
from cadsam import build_model
from cadsam.commands import main
from cadsam.fast.runtime import (
    AUTO,
    LEAN,
    ROOMY,
    WARMUP_SWITCHES,
    Runtime,
    repaying_images,
    resolve_runtime,
    settle_job_size,
)
from cadsam.weights import save_weights

# 60 s / (1/47.6 - 1/171.5 s per image) = 60 / 0.0151780 = 3953.1: from 3,954 images
TRAIN_PAYS_FROM = 3954
# 9.7 s / (0.0851 s / 4 images) = 455.9: from 456 images
INFER_PAYS_FROM = 456


def test_the_thresholds_follow_from_the_measured_figures():
    assert repaying_images(60.0, 47.6, 171.5) == TRAIN_PAYS_FROM
    assert repaying_images(9.7, 4 / 0.0851, float("inf")) == INFER_PAYS_FROM
    assert repaying_images(10.0, 1.0, 2.0) == 20  # 10 s over 0.5 s saved per image


@pytest.mark.parametrize(
    ("training", "pays_from", "warmup"), [(True, TRAIN_PAYS_FROM, 60), (False, INFER_PAYS_FROM, 10)]
)
def test_a_small_job_on_cuda_compiles_nothing_auto_would(training, pays_from, warmup):
    small, said = settle_job_size(ROOMY, "cuda", pays_from - 1, training)
    for name in WARMUP_SWITCHES:
        assert getattr(ROOMY, name) == AUTO and getattr(small, name) is False, name
    others = {f.name for f in dataclasses.fields(Runtime)} - set(WARMUP_SWITCHES)
    assert {n: getattr(small, n) for n in others} == {n: getattr(ROOMY, n) for n in others}
    images = f"{pays_from - 1:,} images"
    assert said.startswith("compilation and CUDA graph off" if training else "compilation off:")
    assert f"{images} do not repay its warm-up (~{warmup} s; from ~{pays_from:,})" in said
    large, said = settle_job_size(ROOMY, "cuda", pays_from, training)
    assert large == ROOMY and f"{pays_from:,} images repay its warm-up" in said


def test_settings_given_stand_and_elsewhere_nothing_changes():
    pinned = ROOMY.replace(compile_encoder=True, cuda_graph=True, triton_kernels=False)
    settled, said = settle_job_size(pinned, "cuda", 40, True)
    assert settled.compile_encoder is True and settled.cuda_graph is True
    assert settled.compile_decoder is False and settled.compile_tiles is False
    assert "40 images do not repay" in said
    for device, images in (("cpu", 40), ("cuda", None)):  # a CPU; a job of unknown size
        assert settle_job_size(ROOMY, device, images, True) == (ROOMY, "")
    plain = Runtime(fused_attention=True)  # nothing auto: nothing to say
    assert settle_job_size(plain, "cuda", 1, False) == (plain, "")
    one, said = settle_job_size(LEAN, "cuda", 1, False)
    assert one.compile_tiles is False and "compilation off: 1 image do" in said


@pytest.fixture
def stand_in_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * 2**30, 2**40))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Stand-in GPU")


def test_resolve_runtime_says_in_its_line_what_it_chose_and_why(stand_in_gpu):
    cad = ("cad", "vit_b")
    runtime, said = resolve_runtime("auto", None, "cuda", cad, job_images=40)
    assert runtime.cuda_graph is False and runtime.compile_encoder is False
    assert said.count("\n") == 0
    assert "compilation and CUDA graph off: 40 images do not repay its warm-up (~60 s" in said
    runtime, said = resolve_runtime("auto", None, "cuda", cad, job_images=20_000)
    assert runtime.cuda_graph is True and runtime.compile_encoder == AUTO
    assert "20,000 images repay" in said
    given = {"compile_encoder": True, "cuda_graph": True}
    runtime, _ = resolve_runtime("auto", given, "cuda", cad, job_images=40)
    assert runtime.compile_encoder is True and runtime.cuda_graph is True
    runtime, said = resolve_runtime("auto", None, "cpu", cad, job_images=40)
    assert runtime == Runtime(fused_attention=True) and "repay" not in said


def _pairs(folder, count: int) -> tuple[str, str]:
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True), masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
        Image.fromarray(np.full((32, 32), 255 * (i % 2), np.uint8)).save(masks / f"{i}.png")
    return str(images), str(masks)


@pytest.fixture
def asked(monkeypatch):
    """What each resolution was told of the job: its images and precision."""
    calls: list[tuple[int | None, str | None]] = []
    resolve = runtime_module.resolve_runtime

    def spy(*args, job_images=None, precision=None, **kwargs):
        calls.append((job_images, precision))
        return resolve(*args, job_images=job_images, precision=precision, **kwargs)

    monkeypatch.setattr(runtime_module, "resolve_runtime", spy)
    return calls


def test_eval_and_predict_weigh_their_images(tmp_path, asked, capsys):
    images, masks = _pairs(tmp_path / "data", 3)
    weights = tmp_path / "w.safetensors"
    model = build_model("decoder", "vit_tiny")
    save_weights(weights, model, {"name": None, "sha256": None}, 32)
    scored = ["eval", "--weights", str(weights), "--images", images, "--masks", masks]
    assert main([*scored, "--device", "cpu", "--num-workers", "0", "--no-progress"]) == 0
    predicted = ["predict", "--weights", str(weights), "--images", images]
    out = ["--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main([*predicted, *out, "--precision", "bf16"]) == 0
    assert asked == [(3, "fp32"), (3, "bf16")]


class _SettledError(Exception):
    """Stops a training run once its runtime is settled."""


def test_training_weighs_its_images_times_epochs(tmp_path, monkeypatch):
    """Resolved twice: refused before any work, then settled for the job once its pairs are
    known (3 pairs x 2 epochs)."""
    import cadsam.training as training

    calls = []

    def spy(*args, **kwargs):
        calls.append((args[5:], kwargs))
        if len(calls) == 2:
            raise _SettledError
        return runtime_module.resolve_runtime(*args, **kwargs)

    monkeypatch.setattr(training, "resolve_runtime", spy)
    images, masks = _pairs(tmp_path / "data", 3)
    args = ["train", "--method", "decoder", "--backbone", "vit_tiny", "--epochs", "2"]
    args += ["--images", images, "--masks", masks, "--out", str(tmp_path / "run")]
    with pytest.raises(_SettledError):
        main([*args, "--precision", "bf16", "--device", "cpu", "--no-progress"])
    assert calls == [((), {"precision": "bf16"}), ((6, "bf16"), {})]
