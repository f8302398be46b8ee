"""The commands end to end on CUDA, as a user runs them: a SAM checkpoint in Meta's format, an
embedding cache, training (from the cache and with the encoder, fp32 and bf16, graphed),
evaluation and prediction, each checked against the same work on the CPU; the same on SAM 2.1
(CAD from its cache, LoRA in Hiera); and a graphed run killed after an epoch resumes to the
end of an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import _isbi_subset

import cadsam.training
from cadsam.commands import main
from cadsam.sam import build_sam
from cadsam.sam2 import build_sam2

SIZE = "128"  # training resolution: small, so each command takes seconds
SAM2_TEST = "sam2.1_hiera_tiny_test"


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    """Random SAM weights saved as Meta's checkpoints are: a plain state_dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(build_sam("vit_tiny").state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    """Random SAM 2.1 weights (its small test configuration) saved as Meta's checkpoints are:
    the state_dict under "model"."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny_test.pt"
    torch.save({"model": build_sam2(SAM2_TEST).state_dict()}, path)
    return str(path)


def _train(sam_file, data, out, *extra, method="cad", backbone="vit_tiny"):
    args = ["train", "--method", method, "--backbone", backbone, "--checkpoint", sam_file]
    args += [*data, "--image-size", SIZE, "--batch-size", "2", "--set", "num_workers=0"]
    args += ["--no-progress", "--out", str(out), *extra]
    assert main(args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cache_train_eval_predict_on_cuda(tmp_path, sam_file, capsys):
    data = _isbi_subset(tmp_path, 6)
    cache = tmp_path / "cache"
    assert main(["cache", "--backbone", "vit_tiny", "--checkpoint", sam_file, "--images", data[1],
                 "--out", str(cache), "--image-size", SIZE, "--device", "cuda",
                 "--num-workers", "0", "--views", "identity", "hflip"]) == 0  # fmt: skip
    common = ("--epochs", "2", "--device", "cuda", "--set", "adapter_size=128")
    # auto graphs CAD's step where its capture fits (the encoder run below): this one is eager
    cached = _train(sam_file, data, tmp_path / "cached", *common, "--cache", str(cache),
                    "--set", "cuda_graph=false")  # fmt: skip
    graphed = _train(sam_file, data, tmp_path / "graphed", *common, "--cache", str(cache),
                     "--set", "cuda_graph=true", "--precision", "bf16")  # fmt: skip
    encoder = _train(sam_file, data, tmp_path / "encoder", *common, "--precision", "bf16")
    for records in (cached, graphed, encoder):
        assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
        assert records[-1]["peak_memory_mib"] > 0  # it ran on the GPU
    capsys.readouterr()

    scores = {}
    for device in ("cuda", "cpu"):
        assert main(["eval", "--weights", str(tmp_path / "cached"), *data, "--device", device,
                     "--json", "--num-workers", "0"]) == 0  # fmt: skip
        scores[device] = json.loads(capsys.readouterr().out)
    # the same weights on two devices: TF32 convolutions and matmuls on the GPU move logits by
    # ~1e-3 relative, which can flip a handful of pixels near 0 out of 6 x 128 x 128
    for key in ("dice", "iou", "mae"):
        assert scores["cuda"][key] == pytest.approx(scores["cpu"][key], abs=2e-3), key

    masks = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"predicted-{device}"
        assert main(["predict", "--weights", str(tmp_path / "graphed"), "--images", data[1],
                     "--out", str(out), "--device", device]) == 0  # fmt: skip
        masks[device] = [np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]
    assert len(masks["cuda"]) == 6
    agree = np.mean([np.mean(a == b) for a, b in zip(masks["cuda"], masks["cpu"], strict=True)])
    assert agree > 0.99  # the same masks, bar pixels whose logit is within rounding of 0


def test_sam2_cache_train_eval_predict_on_cuda(tmp_path, sam2_file, capsys):
    """SAM 2.1 on CUDA from a Meta-format file: its cache (the embedding and the
    high-resolution maps), CAD trained from it with the step graphed, LoRA trained in Hiera,
    both in bf16 under ``auto`` (frozen weights in bf16; LoRA's decoder compiled, as ``auto``
    compiles it for a large job); evaluation and prediction on CUDA agree with the CPU's."""
    data = _isbi_subset(tmp_path, 4)
    sam2 = ["--backbone", SAM2_TEST, "--checkpoint", sam2_file]
    cache = tmp_path / "cache"
    assert main(["cache", *sam2, "--images", data[1], "--out", str(cache), "--image-size", SIZE,
                 "--device", "cuda", "--num-workers", "0"]) == 0  # fmt: skip
    common = ("--epochs", "2", "--device", "cuda", "--precision", "bf16")
    runs = {"cad": tmp_path / "cad", "lora": tmp_path / "lora"}
    graphed = ("--cache", str(cache), "--set", "cuda_graph=true", "--set", "adapter_size=64")
    cad = _train(sam2_file, data, runs["cad"], *common, *graphed, backbone=SAM2_TEST)
    compiled = ("--set", "compile_decoder=true")
    lora = _train(
        sam2_file, data, runs["lora"], *common, *compiled, method="lora", backbone=SAM2_TEST
    )
    for records in (cad, lora):
        assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
        assert records[-1]["peak_memory_mib"] > 0  # it ran on the GPU
    capsys.readouterr()

    for method, run in runs.items():
        scores = {}
        for device in ("cuda", "cpu"):
            assert main(["eval", "--weights", str(run), *data, "--device", device, "--json",
                         "--num-workers", "0"]) == 0  # fmt: skip
            scores[device] = json.loads(capsys.readouterr().out)
        for key in ("dice", "iou", "mae"):  # as for SAM above: TF32 on the GPU
            assert scores["cuda"][key] == pytest.approx(scores["cpu"][key], abs=2e-3), (method, key)

    masks = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"predicted-{device}"
        assert main(["predict", "--weights", str(runs["cad"]), "--images", data[1],
                     "--out", str(out), "--device", device]) == 0  # fmt: skip
        masks[device] = [np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]
    assert len(masks["cuda"]) == 4
    agree = np.mean([np.mean(a == b) for a, b in zip(masks["cuda"], masks["cpu"], strict=True)])
    assert agree > 0.99


def _relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """All tensors of ``a`` against ``b``'s as one vector: |a - b| / |b|."""
    assert a.keys() == b.keys()
    diff = sum((a[k].double() - b[k].double()).square().sum() for k in b)
    return (diff / sum(b[k].double().square().sum() for k in b)).sqrt().item()


def _run_record(out) -> tuple[list[dict], dict[str, torch.Tensor]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], load_file(str(out / "last.safetensors"))


def test_a_killed_graphed_run_resumes_to_the_uninterrupted_end(tmp_path, sam_file, monkeypatch):
    """Graphed from its fourth step, killed after epoch 1, resumed (graphed again): it ends
    where the run that was never stopped ends, schedule and data order included, as near as
    a second uninterrupted run does. (On CUDA two identical runs differ in rounding: atomics
    in interpolation's backward, cuDNN's choices; AdamW's normalised steps carry that into
    the weights. The second run measures that spread; resuming may add nothing to it.)"""
    data = _isbi_subset(tmp_path, 6)
    common = ("--epochs", "3", "--device", "cuda", "--set", "cuda_graph=true")
    common += ("--set", "adapter_size=64", "--set", "schedule=cosine")
    _train(sam_file, data, tmp_path / "whole", *common)
    _train(sam_file, data, tmp_path / "again", *common)

    save = cadsam.training._save_epoch

    def save_then_stop(run, record):
        save(run, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(cadsam.training, "_save_epoch", save_then_stop)
    args = ["train", "--method", "cad", "--backbone", "vit_tiny", "--checkpoint", sam_file]
    args += [*data, "--image-size", SIZE, "--batch-size", "2", "--set", "num_workers=0"]
    assert main([*args, "--no-progress", "--out", str(tmp_path / "killed"), *common]) == 130
    monkeypatch.setattr(cadsam.training, "_save_epoch", save)
    resume = ["train", "--out", str(tmp_path / "killed"), "--resume", "--no-progress"]
    assert main(resume) == 0

    (whole, final), (again, final_again), (resumed, final_resumed) = (
        _run_record(tmp_path / name) for name in ("whole", "again", "killed")
    )
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for r, w in zip(resumed, whole, strict=True):
        assert r["lr"] == pytest.approx(w["lr"], rel=1e-9)  # the schedule carries on exactly

    def loss_gap(records: list[dict]) -> float:
        return max(
            abs(r["loss"] - w["loss"]) / w["loss"] for r, w in zip(records, whole, strict=True)
        )

    # 3x: two draws of the same spread; the floor: float32 rounding, for runs that agree
    spread = _relative_distance(final_again, final)
    gap = _relative_distance(final_resumed, final)
    assert gap <= 3 * spread + 1e-6, f"resumed {gap:.2e} from the whole run, again {spread:.2e}"
    assert loss_gap(resumed) <= 3 * loss_gap(again) + 1e-6, (loss_gap(resumed), loss_gap(again))


def test_classes_graphed_train_eval_predict_on_cuda(tmp_path, sam_file, capsys):
    """K classes on CUDA: CAD's step with the cross-entropy + Dice loss replayed as a CUDA
    graph, from the encoder; eval's per-class scores and predict's label maps agree with the
    same weights on the CPU."""
    from test_classes import CAMVID, NAMES

    data = []
    for part in ("images", "labels"):
        folder = tmp_path / part
        folder.mkdir()
        for path in sorted((CAMVID / "train" / part).iterdir())[:4]:
            (folder / path.name).symlink_to(path)
        data += [f"--{'masks' if part == 'labels' else part}", str(folder)]
    (tmp_path / "classes.yaml").write_text(json.dumps({"classes": NAMES, "ignore_index": 11}))
    records = _train(sam_file, data, tmp_path / "run", "--epochs", "2", "--device", "cuda",
                     "--set", "adapter_size=128", "--set", "cuda_graph=true",
                     "--classes", str(tmp_path / "classes.yaml"))  # fmt: skip
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    capsys.readouterr()
    scores, labels = {}, {}
    for device in ("cuda", "cpu"):
        assert main(["eval", "--weights", str(tmp_path / "run"), *data, "--device", device,
                     "--json", "--num-workers", "0"]) == 0  # fmt: skip
        scores[device] = json.loads(capsys.readouterr().out.splitlines()[-1])
        out = tmp_path / f"predicted-{device}"
        assert main(["predict", "--weights", str(tmp_path / "run"), "--images", data[1],
                     "--out", str(out), "--device", device]) == 0  # fmt: skip
        labels[device] = [np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]
    assert list(scores["cuda"]["per_class"]) == NAMES
    for key in ("miou", "mdice", "pixel_accuracy"):
        assert scores["cuda"][key] == pytest.approx(scores["cpu"][key], abs=5e-3), key
    assert all(a.shape == (360, 480) and a.max() < 11 for a in labels["cuda"])
    agree = np.mean([np.mean(a == b) for a, b in zip(labels["cuda"], labels["cpu"], strict=True)])
    assert agree > 0.99  # bar pixels where two classes' logits are within rounding


def test_prompted_train_eval_predict_on_cuda(tmp_path, sam_file, capsys):
    """Box-and-point prompts on CUDA: cad trains (the step eager: graphs replay the whole-image
    prompt's), eval scores each object with the same seeded prompts on both devices, and a
    predicted box mask agrees with the CPU's."""
    from test_prompts import KVASIR

    data = ["--images", str(KVASIR / "images"), "--masks", str(KVASIR / "masks")]
    records = _train(sam_file, data, tmp_path / "run", "--epochs", "2", "--device", "cuda",
                     "--set", "adapter_size=128", "--prompt", "box+points")  # fmt: skip
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["peak_memory_mib"] > 0
    capsys.readouterr()
    scores, masks = {}, {}
    image = sorted((KVASIR / "images").iterdir())[0]
    for device in ("cuda", "cpu"):
        assert main(["eval", "--weights", str(tmp_path / "run"), *data, "--device", device,
                     "--json", "--num-workers", "0", "--prompt", "box"]) == 0  # fmt: skip
        scores[device] = json.loads(capsys.readouterr().out.splitlines()[-1])
        out = tmp_path / f"{device}.png"
        assert main(["predict", "--weights", str(tmp_path / "run"), "--images", str(image),
                     "--out", str(out), "--device", device, "--box", "50,40,300,260"]) == 0  # fmt: skip
        masks[device] = np.asarray(Image.open(out))
    assert scores["cuda"]["objects"] == scores["cpu"]["objects"] >= 5
    for key in ("dice", "iou"):
        assert scores["cuda"][key] == pytest.approx(scores["cpu"][key], abs=5e-3), key
    assert np.mean(masks["cuda"] == masks["cpu"]) > 0.99
