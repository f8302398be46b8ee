"""cadsam bench without a GPU, and its report from the H100 results kept in benchmarks/."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from cadsam.backbones import BACKBONES, DEFAULT_BATCH, feature_layout
from cadsam.commands import main
from cadsam.commands.bench import (
    IMAGE_SIZE,
    VARIANT_PROMPTS,
    VARIANTS,
    bench_batch,
    bench_jobs,
    bench_step,
    encoder_forward,
    markdown_table,
    run_bench,
    variant_runtime,
)
from cadsam.config import TrainConfig
from cadsam.errors import CadsamError
from cadsam.fast.runtime import LEAN, Runtime
from cadsam.methods import build_model
from cadsam.step import object_loss

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "h100_vit_b.json"


def test_bench_refuses_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--out", "unused"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_paper_figures_stand_beside_their_methods_only():
    rows = {
        line.split(" | ")[1]: line.split(" | ")
        for line in markdown_table(json.loads(RESULTS.read_text())).splitlines()
        if line.startswith("| vit_b |") and "| fp32 |" in line
    }
    assert rows["decoder-plain"][5] == "14113" and rows["decoder"][5] == "14113"
    assert rows["cad"][5] == "17697" and rows["cad"][6] == "15775"
    assert rows["cad-cache"][5] == "" and rows["sam-adapter-paper-ckpt"][5] == ""
    assert rows["decoder"][7] == "910"  # peak allocated, from the JSON


def test_bench_set_checks_runtime_settings_before_running(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--variants", "decoder", "--set", "warp_speed=8"]) == 1
    assert "--set warp_speed: no such setting" in capsys.readouterr().err
    assert main(["bench", "--variants", "decoder", "--set", "lr=0.1"]) == 1
    assert "bench takes model options and runtime switches" in capsys.readouterr().err
    assert main(["bench", "--variants", "cad", "--set", "lora_rank=8"]) == 1
    assert "method cad does not take lora_rank" in capsys.readouterr().err
    assert main(["bench", "--variants", "decoder", "cad", "--set", "adapter_tile_mib=8"]) == 1
    assert "which method decoder does not have" in capsys.readouterr().err
    assert main(["bench", "--variants", "cad", "--set", "adapter_tile_mib"]) == 1
    assert "--set takes NAME=VALUE" in capsys.readouterr().err
    # a valid setting gets as far as the GPU check
    assert main(["bench", "--variants", "cad-cache", "--set", "adapter-tile-mib=8"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "--variants", "lora", "--set", "lora_rank=8"]) == 1  # a model option
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_set_refuses_to_contradict_a_variant(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = ["bench", "--variants", "cad-cache", "cad-cache-eager", "--set", "cuda_graph=true"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "contradicts variant cad-cache-eager" in err and "cuda_graph=False" in err
    # without --methods, every variant is measured: the same contradiction
    assert main(["bench", "--backbones", "sam2.1_hiera_l", "--set", "cuda_graph=true"]) == 1
    assert "contradicts variant cad-eager" in capsys.readouterr().err


def test_overridden_options_appear_in_the_report():
    report = json.loads(RESULTS.read_text())
    row = {**report["results"][0], "overrides": {"adapter_tile_mib": 32}}
    table = markdown_table({**report, "results": [row]})
    assert f"| {row['variant']} adapter_tile_mib=32 |" in table


def test_every_variant_is_a_valid_method_and_runtime():
    """Each variant's method exists and its runtime settings are valid, on any device; the
    cached and eager ones are what their names say (on a CPU no step is graphed)."""
    from cadsam.commands.bench import VARIANTS, variant_runtime
    from cadsam.methods import resolve_options

    for variant in VARIANTS:
        method, runtime, _ = variant_runtime(variant, "vit_b", device="cpu")
        resolve_options(method, {})
        assert runtime.cuda_graph is False, variant  # auto's, settled for a CPU, or -eager's
        assert (runtime == Runtime()) == variant.endswith("-plain"), variant
    assert variant_runtime("cad-cache-eager", "vit_b", device="cpu")[2] is True
    assert variant_runtime("cad-lean", "vit_b", device="cpu")[1] == LEAN


def test_prompted_variants_run_eager_on_cuda_as_train_runs_them(monkeypatch, capsys):
    """On a roomy GPU auto replays CAD's whole-image step as a graph; a prompted step, which
    train never graphs, stays eager (stood in for by CUDA's free memory: no GPU needed), and
    a graph asked for is refused, as train refuses it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a roomy GPU")
    assert variant_runtime("cad", "vit_b", device="cuda")[1].cuda_graph is True
    assert variant_runtime("cad-box8", "vit_b", device="cuda")[1].cuda_graph is False
    assert main(["bench", "--variants", "cad-box8", "--set", "cuda_graph=true"]) == 1
    assert "variant cad-box8 is prompted" in capsys.readouterr().err


SAM2_TINY = "sam2.1_hiera_tiny_test"


def test_every_backbone_has_a_batch_and_bench_feeds_what_train_feeds():
    assert set(DEFAULT_BATCH) == set(BACKBONES)
    assert DEFAULT_BATCH["sam2.1_hiera_b+"] == 4 and DEFAULT_BATCH["sam2.1_hiera_l"] == 2
    assert TrainConfig(method="cad", backbone=SAM2_TINY, out="unused").image_size == IMAGE_SIZE
    for backbone in ("vit_b", "vit_h", "sam2.1_hiera_l"):  # and the batch train feeds
        config = TrainConfig(method="cad", backbone=backbone, out="unused")
        assert config.batch_size == DEFAULT_BATCH[backbone]


def _small_step(monkeypatch, backbone: str) -> None:
    """Bench's data at 64 pixels, batch 2: the same code, a few seconds on a CPU."""
    monkeypatch.setattr("cadsam.commands.bench.IMAGE_SIZE", 64)
    monkeypatch.setitem(DEFAULT_BATCH, backbone, 2)


def _model(variant: str, backbone: str = SAM2_TINY):
    method, runtime, from_cache = variant_runtime(variant, backbone, device="cpu")
    options = {"adapter_size": 32} if method == "cad" else {}
    torch.manual_seed(0)
    model = build_model(method, backbone, with_encoder=not from_cache, runtime=runtime, **options)
    return model, from_cache


def test_cached_batch_is_what_the_sam2_decoder_reads(monkeypatch):
    """A SAM 2.1 cache row packs the embedding and both high-resolution maps: bench's random
    one has the shape and dtype of the frozen encoder's output for the same images."""
    _small_step(monkeypatch, SAM2_TINY)
    cached, _ = _model("cad-cache")
    with_encoder, _ = _model("decoder")
    images, masks, embeddings = bench_batch(cached, from_cache=True)
    decoder_input = with_encoder.frozen_embeddings(images)
    assert embeddings.shape == decoder_input.shape == (2, *cached.layout.shape)
    assert embeddings.shape == (2, 256 * 16 * 16 + 32 * 64 * 64 + 64 * 32 * 32)
    assert embeddings.dtype == decoder_input.dtype == torch.float32
    assert images.shape == (2, 3, 64, 64) and masks.shape == (2, 1, 64, 64)
    assert bench_batch(with_encoder, from_cache=False)[2] is None


def test_cached_batch_of_sam1_is_its_embedding(monkeypatch):
    _small_step(monkeypatch, "vit_tiny")
    model, _ = _model("cad-cache", "vit_tiny")
    assert bench_batch(model, from_cache=True)[2].shape == (2, 256, 16, 16)


@pytest.mark.parametrize("variant", ["cad-cache", "cad", "lora"])
def test_bench_step_trains_sam2_from_a_cache_and_with_the_encoder(monkeypatch, variant):
    _small_step(monkeypatch, SAM2_TINY)
    model, from_cache = _model(variant)
    assert (model.sam.image_encoder is None) == from_cache
    before = [p.detach().clone() for p in model.trainable_parameters()]
    loss = bench_step(model, "fp32", from_cache)()
    assert torch.isfinite(loss) and loss > 0
    after = model.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_a_prompted_bench_step_is_the_per_object_step_train_runs(monkeypatch):
    """cad-box8's step: 8 objects an image, each a box inside the image and a mask; its loss
    is the per-object loss of the model's output for those boxes, taken before AdamW moves
    the weights, and AdamW moves them."""
    _small_step(monkeypatch, "vit_tiny")
    model, from_cache = _model("cad-box8", "vit_tiny")
    reference = copy.deepcopy(model)
    step = bench_step(model, "fp32", from_cache, prompt=VARIANT_PROMPTS["cad-box8"])
    images, masks, embeddings, prompts = step.args
    assert masks.shape == (2, 8, 64, 64) and prompts.boxes.shape == (2, 8, 4) and embeddings is None
    x0, y0, x1, y1 = prompts.boxes.unbind(-1)
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 64).all())
    assert bool((x1 > x0).all() and (y1 > y0).all())
    loss = step()
    expected = object_loss(reference.train()(images, None, prompts).float(), masks)
    assert torch.allclose(loss, expected.detach(), rtol=1e-5)
    moved = zip(model.trainable_parameters(), reference.trainable_parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in moved)


def test_bench_shape_flags_reach_the_step_and_the_report(monkeypatch):
    """--batch-size, --image-size and --set adapter_size: what `plan` is checked against
    beyond the paper's settings. The data and the model take them; the report's label says
    them, and every job carries them to its process."""
    model, _ = _model("cad", "vit_tiny")
    images, masks, _ = bench_batch(model, from_cache=False, batch=3, image_size=48)
    assert images.shape == (3, 3, 48, 48) and masks.shape == (3, 1, 48, 48)
    shape = {"batch": 3, "image_size": 48, "adapter_size": 64}
    jobs = bench_jobs(["vit_tiny"], ["cad", "cad-cache"], ["fp32"], 2, {}, shape)
    assert [job["shape"] for job in jobs] == [shape, shape]
    assert "shape" not in bench_jobs(["vit_tiny"], ["cad"], ["fp32"], 2, {})[0]
    report = json.loads(RESULTS.read_text())
    row = {**report["results"][0], "shape": shape, "overrides": {"adapter_tile_mib": 32}}
    table = markdown_table({**report, "results": [row]})
    assert f"| {row['variant']} image_size=48 adapter_size=64 adapter_tile_mib=32 |" in table


def test_bench_shape_flags_are_checked_before_running(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--variants", "cad", "lora", "--set", "adapter_size=256"]) == 1
    assert "method lora does not take adapter_size" in capsys.readouterr().err
    assert main(["bench", "--variants", "cad", "--batch-size", "0"]) == 1
    assert "--batch-size must be at least 1, not 0" in capsys.readouterr().err
    assert main(["bench", "--variants", "cad", "--set", "adapter_size=256"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err  # as far as the GPU check


@pytest.mark.parametrize("backbone", [SAM2_TINY, "vit_tiny"])
def test_encoder_forward_gives_what_a_cache_row_holds(backbone):
    out = encoder_forward(backbone, "fp32", batch=2, device="cpu")()
    assert out.shape == (2, *feature_layout(backbone).shape)
    assert torch.isfinite(out).all()


def test_bench_refuses_sam_adapter_on_sam2_before_measuring(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = ["bench", "--backbones", "vit_b", "sam2.1_hiera_l", "--variants", "cad"]
    assert main([*args, "sam-adapter-lean"]) == 1
    err = capsys.readouterr().err.strip()
    assert "sam-adapter-lean is SAM 1 only" in err and "sam2.1_hiera_l" in err
    assert len(err.splitlines()) == 1 and "CUDA" not in err
    with pytest.raises(CadsamError, match="sam-adapter-paper is SAM 1 only"):
        run_bench(["sam2.1_hiera_b+"], ["sam-adapter-paper"], ["fp32"], Path("unused"))
    # the same variants on SAM 1, and no --methods on SAM 2.1, get as far as the GPU check
    assert main(["bench", "--backbones", "vit_b", "--variants", "sam-adapter-lean"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "--backbones", "sam2.1_hiera_b+"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_default_variants_leave_sam_adapter_out_on_sam2_only():
    jobs = bench_jobs(["vit_b", "sam2.1_hiera_b+"], None, ["bf16"], 5, {})
    by_backbone = {
        b: {job["variant"] for job in jobs if job["backbone"] == b}
        for b in ("vit_b", "sam2.1_hiera_b+")
    }
    assert by_backbone["vit_b"] == {*VARIANTS, "encoder-forward"}
    sam_adapter = {v for v in VARIANTS if v.startswith("sam-adapter")}
    assert by_backbone["sam2.1_hiera_b+"] == by_backbone["vit_b"] - sam_adapter
    assert {"lora", "cad-eager", "cad-cache-eager"} <= by_backbone["sam2.1_hiera_b+"]


def test_sam2_rows_have_no_paper_figures():
    row = {
        "backbone": "sam2.1_hiera_b+",
        "variant": "cad",
        "method": "cad",
        "precision": "bf16",
        "batch": 4,
        "trainable": 5_831_908,
        "peak_allocated_mib": 2000.0,
        "peak_reserved_mib": 2100.0,
        "images_per_second": 50.0,
    }
    report = json.loads(RESULTS.read_text())
    table = markdown_table({**report, "results": [row]})
    assert (
        "| sam2.1_hiera_b+ | cad | bf16 | 4 | 5,831,908 |  |  | 2,000 | 2,100 |  | 50.0 |" in table
    )
