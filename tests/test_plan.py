"""cadsam plan: memory counted on the meta device against the recorded benchmark rows, the GPU
memory parser, the largest batch, and the command's JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import resource
from pathlib import Path

import pytest
import torch

from cadsam import planning, training
from cadsam.commands import main
from cadsam.config import TrainConfig
from cadsam.data.prompts import PromptSettings
from cadsam.errors import CadsamError
from cadsam.fast.runner import fit
from cadsam.planning import (
    KNOWN_GPUS,
    PlanRequest,
    largest_batch,
    parse_gpu_memory,
    predict_memory,
    speed_from_bench,
    train_command,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _constants_script():
    spec = importlib.util.spec_from_file_location(
        "plan_constants", BENCHMARKS / "plan_constants.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _canonical_rows() -> list[tuple[dict, object]]:
    if not (BENCHMARKS / "results").is_dir():
        return []
    script = _constants_script()
    return [(row, script) for f in script.canonical_folders() for row in script.training_rows(f)]


ROWS = _canonical_rows()


@pytest.mark.skipif(not ROWS, reason="no recorded benchmark results (benchmarks/results)")
@pytest.mark.parametrize(
    "row,script",
    ROWS,
    ids=[f"{r['backbone']}-{r['variant']}-{r['precision']}" for r, _ in ROWS],
)
def test_prediction_within_15_percent_of_each_canonical_row(row, script):
    """Every row of the canonical runs (SAM and SAM 2.1, fp32 and bf16, every runtime), read
    from its recorded bench.json, under the runtime it ran."""
    estimate = predict_memory(script.row_request(row))
    measured = row["peak_allocated_mib"]
    assert abs(estimate.total_mib - measured) <= 0.15 * measured, (estimate.total_mib, measured)


def test_gpu_memory_sizes_and_cards():
    assert parse_gpu_memory("12GiB") == 12 * 1024
    assert parse_gpu_memory("12") == 12 * 1024
    assert parse_gpu_memory("24GB") == 24 * 1024
    assert parse_gpu_memory("24 gb") == 24 * 1024
    assert parse_gpu_memory("12288MiB") == 12288
    assert parse_gpu_memory("1.5GiB") == 1536
    assert parse_gpu_memory("RTX3060") == 12 * 1024
    assert parse_gpu_memory("a100-80gb") == 80 * 1024
    assert parse_gpu_memory("h100") == 80 * 1024
    assert KNOWN_GPUS["rtx4090"] == 24 and KNOWN_GPUS["a100-40gb"] == 40 and KNOWN_GPUS["t4"] == 16


@pytest.mark.parametrize("text", ["", "abc", "12TB", "-4", "0", "rtx9999", "12 GiB GiB"])
def test_gpu_memory_bad_input_is_one_line(text):
    with pytest.raises(CadsamError) as error:
        parse_gpu_memory(text)
    message = str(error.value)
    assert "\n" not in message and "--gpu-memory" in message and repr(text) in message


def test_request_refuses_what_train_refuses():
    with pytest.raises(CadsamError, match="--cache"):
        PlanRequest(method="lora", cache=True)
    with pytest.raises(CadsamError, match="SAM 1 only"):
        PlanRequest(method="sam-adapter", backbone="sam2.1_hiera_t")
    with pytest.raises(CadsamError, match="--batch-size"):
        PlanRequest(batch_size=0)


def test_parts_add_up_and_match_a_real_step_on_the_cpu():
    """The weights, gradients and AdamW state counted on the meta device equal those of a real
    step (forward, backward, AdamW) on the CPU, measured from its tensors."""
    import torch

    from cadsam.fast.graphs import adamw
    from cadsam.methods import build_model
    from cadsam.step import forward_backward

    request = PlanRequest(method="decoder", backbone="vit_tiny", batch_size=1, image_size=64)
    estimate = predict_memory(request, constants={})
    torch.manual_seed(0)
    model = build_model("decoder", "vit_tiny").train()
    optimizer = adamw(model.trainable_parameters(), lr=1e-4, weight_decay=0.01)
    images, masks = torch.rand(1, 3, 64, 64) * 255, (torch.rand(1, 1, 64, 64) > 0.5).float()
    forward_backward(model, images, masks, None, "fp32")
    optimizer.step()
    weights = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    states = sum(t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert estimate.weights_mib == pytest.approx(weights / 2**20)
    assert estimate.optimiser_mib == pytest.approx((grads + states) / 2**20)
    assert estimate.overhead_mib == 0
    parts = estimate.weights_mib + estimate.optimiser_mib + estimate.activations_mib
    assert estimate.total_mib == pytest.approx(parts)


def test_vit_h_counted_without_its_weights():
    """ViT-H's 2.4 GiB of weights are shapes only: the process does not grow by them."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    estimate = predict_memory(PlanRequest(method="lora", backbone="vit_h", runtime="lean"))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert estimate.weights_mib > 2000 and grown_mib < 1000
    model = planning._meta_model("lora", "vit_h", False, 1, (), False)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("backbone", ["vit_tiny", "sam2.1_hiera_tiny_test"])
def test_encoder_chunks_counted_from_two_runs_as_from_every_run(backbone, monkeypatch):
    """``lean`` runs the frozen encoder one image at a time: counting its first and last runs
    (the chunks between only allocate their output) gives the peak of running them all, both
    for the encoder's own loop and for the whole step."""
    request = PlanRequest(method="cad", backbone=backbone, batch_size=5, image_size=128)
    request = dataclasses.replace(request, runtime="lean")
    runtime = planning.plan_runtime(request, None)
    assert runtime.encoder_chunk == 1

    def encoder_peak(shortcut: bool) -> int:
        model = planning._meta_model("cad", backbone, False, 1, (), False)
        model = fit(model, planning._counted_runtime(runtime))
        live = planning._LiveBytes({t.untyped_storage()._cdata for t in model.parameters()})
        encoder = model.sam.image_encoder if shortcut else None
        with live, planning._chunks_run_twice(encoder, 5), planning._meta_autocast():
            model.frozen_embeddings(torch.empty(5, 3, 128, 128, device="meta"))
        return live.peak

    assert encoder_peak(True) == encoder_peak(False) > 0
    two_runs = planning.count_step.__wrapped__(request, runtime)
    monkeypatch.setattr(planning, "_chunks_run_twice", lambda *_: contextlib.nullcontext())
    assert two_runs == planning.count_step.__wrapped__(request, runtime)


@pytest.mark.parametrize("tile_mib", [0.25, 1.0], ids=["bands", "an-image-a-band"])
def test_bands_counted_on_two_images_as_on_every_image(monkeypatch, tile_mib):
    """CAD's banded blocks counted on their first two images' bands give the count of every
    image's: each image's transients come in turn, what outlives them is allocated whole, and
    what one image leaves to the next (with a whole image a band, the input gradient written
    after the next band reads its rows) is there from the second image on."""
    from cadsam.fast import tiling

    request = PlanRequest("cad", "vit_tiny", 3, 64, runtime="lean")
    request = dataclasses.replace(
        request, options=(("adapter_size", 64),), settings=(("adapter_tile_mib", tile_mib),)
    )
    runtime = planning.plan_runtime(request)
    images, bands = [], tiling._Bands.bands

    def seen(self):
        for band in bands(self):
            images.append(band[0].start)
            yield band

    monkeypatch.setattr(tiling._Bands, "bands", seen)
    two_images = planning.count_step.__wrapped__(request, runtime)
    seen_by_two, images[:] = set(images), []
    monkeypatch.setattr(planning, "_bands_of_two_images", contextlib.nullcontext)
    assert two_images == planning.count_step.__wrapped__(request, runtime)
    assert seen_by_two == set(images) == {0, 1, 2}  # (2: seen where the two stop)


def test_more_images_more_memory_and_the_largest_batch_is_the_last_that_fits():
    request = PlanRequest(method="cad", backbone="vit_tiny", image_size=64, runtime="lean")
    totals = [predict_memory(request.with_batch(b), 4096).total_mib for b in (1, 2, 4)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    context = -planning.usable_mib(0)  # what the GPU holds beyond tensors
    gpu = context + totals[0] + 3 * (totals[1] - totals[0])  # about 4 images' worth
    batch = largest_batch(request, gpu)
    assert batch >= 1
    assert predict_memory(request.with_batch(batch), gpu).fits
    assert not predict_memory(request.with_batch(batch + 1), gpu).fits
    assert largest_batch(request, gpu / 4) <= batch
    assert largest_batch(request, 1.0) == 0


def test_speed_is_quoted_from_a_measured_row_only():
    rows = [
        {
            "method": "cad",
            "backbone": "vit_b",
            "cache": False,
            "precision": "bf16",
            "runtime": "auto",
            "classes": 1,
            "eager": False,
            "batch": 4,
            "images_per_second": 179.1,
            "gpu": "NVIDIA H200",
            "variant": "cad",
            "source": "benchmarks/results/x",
        }
    ]
    found = speed_from_bench(PlanRequest(precision="bf16", batch_size=8), rows)
    assert found is not None and found.images_per_second == 179.1 and found.gpu == "NVIDIA H200"
    assert "NVIDIA H200" in found.describe() and "batch 4" in found.describe()
    assert speed_from_bench(PlanRequest(precision="fp32"), rows) is None
    assert speed_from_bench(PlanRequest(precision="bf16", runtime="lean"), rows) is None
    boxed = {**rows[0], "variant": "cad-box8", "prompt": "box", "prompts_per_image": 8}
    rows.append(boxed | {"images_per_second": 60.0})
    eight, four = (PromptSettings("box", per_image=n) for n in (8, 4))
    found = speed_from_bench(PlanRequest(precision="bf16", prompt=eight), rows)
    assert found is not None and found.images_per_second == 60.0 and "cad-box8" in found.describe()
    assert speed_from_bench(PlanRequest(precision="bf16", prompt=four), rows) is None
    assert speed_from_bench(PlanRequest(precision="bf16"), rows).images_per_second == 179.1


def test_train_command_says_what_differs():
    request = PlanRequest(
        method="cad", backbone="vit_h", batch_size=1, precision="bf16", runtime="lean",
        options=(("adapter_size", 256),), classes=3, grad_accum=2,
    )  # fmt: skip
    command = train_command(request)
    assert command.startswith("cadsam train --method cad --backbone vit_h")
    for words in ("--batch-size 1", "--precision bf16", "--runtime lean", "--classes 3"):
        assert words in command
    assert "--set adapter_size=256" in command and "--set grad_accum=2" in command


def test_plan_json_through_the_command(capsys):
    argv = ["plan", "--method", "decoder", "--backbone", "vit_tiny", "--image-size", "64"]
    assert main([*argv, "--runtime", "auto", "--gpu-memory", "848MiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    auto = report["runtimes"]["auto"]
    assert report["gpu_mib"] == 848 and auto["fits"] is True and auto["largest_batch"] >= 4
    parts = ("weights_mib", "optimiser_mib", "activations_mib", "overhead_mib")
    assert auto["total_mib"] == pytest.approx(sum(auto[k] for k in parts), abs=0.5)
    assert report["recommended"]["command"].startswith("cadsam train --method decoder")


def _tiny_config(tmp_path, **settings) -> TrainConfig:
    defaults = dict(method="cad", batch_size=2, options={"adapter_size": 32})
    return TrainConfig(
        backbone="vit_tiny", out=str(tmp_path / "run"), image_size=64, **(defaults | settings)
    )


def test_train_stops_before_loading_weights_where_plan_says_it_cannot_fit(tmp_path, monkeypatch):
    """A GPU stood in for by its free memory: too little is one line naming the count and
    what plan advises; enough, or memory_check=false, goes on."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a small GPU")
    cuda = torch.device("cuda")
    monkeypatch.setattr(training, "free_gpu_mib", lambda device: 64.0)
    with pytest.raises(CadsamError) as refused:
        training._check_memory(_tiny_config(tmp_path), cuda, print)
    said = str(refused.value)
    assert "\n" not in said and "a small GPU has 64 MiB free" in said
    assert "not even one image fits" in said and "memory_check=false" in said
    training._check_memory(_tiny_config(tmp_path, memory_check=False), cuda, print)
    monkeypatch.setattr(training, "free_gpu_mib", lambda device: 64.0 * 1024)
    training._check_memory(_tiny_config(tmp_path), cuda, print)


def test_refusal_names_the_runtime_and_batch_that_fit():
    """Where the runtime asked for is too large for the free memory but lean fits,
    the refusal says so and gives the command."""
    request = PlanRequest("cad", "vit_b", 8, 512, precision="bf16", runtime="plain")
    plain = predict_memory(request).total_mib
    lean_one = predict_memory(dataclasses.replace(request, runtime="lean", batch_size=1))
    free = (plain + lean_one.total_mib) / 2  # between: plain does not fit, lean does
    said = planning.refusal(request, free, "the GPU")
    assert said is not None and "runtime lean" in said and "cadsam train --method cad" in said
    assert planning.refusal(request, plain * 2, "the GPU") is None


def test_a_count_that_fails_is_said_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def broken(cfg, device):
        raise RuntimeError("meta kernel missing")

    monkeypatch.setattr(training, "_memory_refusal", broken)
    training._check_memory(_tiny_config(tmp_path), torch.device("cuda"), print)
    assert "memory check skipped" in capsys.readouterr().out


def test_plan_without_a_gpu_counts_and_says_what_to_give(capsys):
    argv = ["plan", "--method", "cad", "--backbone", "vit_tiny", "--image-size", "64"]
    assert main([*argv, "--runtime", "lean", "--cache", "runs/cache"]) == 0
    said = capsys.readouterr().out
    assert said.startswith("lean: ") and "give --gpu-memory" in said
    assert main([*argv, "--runtime", "lean", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpu_mib"] is None and report["runtimes"]["lean"]["fits"] is None


def test_prompted_objects_are_counted_and_train_checks_them(tmp_path, monkeypatch):
    """A prompted step runs the decoder once per object: eight objects an image count more
    than one, one box counts as the whole image does, and train's check counts the prompts
    it trains with (a GPU that takes the whole-image run refuses the prompted one)."""
    whole = PlanRequest("decoder", "vit_tiny", 4, 64, runtime="lean")
    boxes = [dataclasses.replace(whole, prompt=PromptSettings("box", per_image=n)) for n in (1, 8)]
    totals = [predict_memory(r).total_mib for r in (whole, *boxes)]
    assert totals[0] == pytest.approx(totals[1], rel=0.01) and totals[2] > totals[1] + 50
    points = dataclasses.replace(whole, prompt=PromptSettings("box+points", 8, 3, 2))
    assert train_command(points).endswith(
        "--prompt box+points --runtime lean --set prompts_per_image=8 --set prompt_points=3 "
        "--set prompt_negatives=2"
    )
    assert planning.plan_runtime(dataclasses.replace(boxes[1], runtime="auto")).cuda_graph is False
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a small GPU")
    free = (totals[0] + totals[2]) / 2  # free beside this process's CUDA context
    monkeypatch.setattr(training, "free_gpu_mib", lambda device: free)
    base = dict(method="decoder", batch_size=4, runtime="lean", options={})
    training._check_memory(_tiny_config(tmp_path, **base), torch.device("cuda"), print)
    prompted = _tiny_config(tmp_path, **base, prompt="box", prompts_per_image=8)
    with pytest.raises(CadsamError, match="a small GPU has"):
        training._check_memory(prompted, torch.device("cuda"), print)


def test_plan_takes_trains_prompt_settings(capsys):
    argv = ["plan", "--method", "decoder", "--backbone", "vit_tiny", "--image-size", "64"]
    argv += ["--runtime", "lean", "--json", "--gpu-memory", "8GiB"]
    given = ["--set", "prompt_points=2", "--set", "box_jitter=0.05"]
    assert main([*argv, "--prompt", "points", *given]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "--prompt points" in report["recommended"]["command"]
    assert "--set prompt_points=2" in report["recommended"]["command"]
    assert "--set box_jitter=0.05" in report["recommended"]["command"]  # train's every name
    assert report["runtimes"]["lean"]["speed"] is None  # no benchmark row is prompted
    assert main([*argv, "--set", "prompts_per_image=2"]) == 1
    assert "give --prompt" in capsys.readouterr().err


def test_gradient_accumulation_holds_the_gradients_through_the_next_micro_batch():
    """Accumulating, a micro-batch runs with every gradient already held: its peak is above a
    whole step's and at most the gradients above it; no graph replays it, and no measured
    row is quoted for it."""
    request = PlanRequest("decoder", "vit_tiny", 2, 64, runtime="lean")
    runtime = planning.plan_runtime(request)
    one = planning.count_step(request, runtime)
    two = planning.count_step(dataclasses.replace(request, grad_accum=2), runtime)
    assert two.gradients_mib == one.gradients_mib > 0
    assert one.step_mib < two.step_mib <= one.step_mib + one.gradients_mib
    graphed = PlanRequest("cad", "vit_b", precision="bf16")
    assert planning.plan_runtime(graphed).cuda_graph is True
    assert planning.plan_runtime(dataclasses.replace(graphed, grad_accum=4)).cuda_graph is False
    row = {"method": "cad", "backbone": "vit_b", "cache": False, "precision": "bf16"}
    row |= {"runtime": "auto", "batch": 4, "images_per_second": 1.0, "gpu": "g", "variant": "cad"}
    rows = [row | {"source": "s"}]
    assert speed_from_bench(graphed, rows) is not None
    assert speed_from_bench(dataclasses.replace(graphed, grad_accum=4), rows) is None


def test_plan_set_sorts_as_train_does(capsys):
    """Model options of any method, grad_accum and the prompt's settings, typed as train types
    them; train's other settings, and values of the wrong type, are one line each."""
    argv = ["plan", "--method", "lora", "--backbone", "vit_tiny", "--image-size", "64"]
    argv += ["--runtime", "lean", "--json", "--gpu-memory", "8GiB"]
    optimiser = []
    for rank in (4, 64):
        assert main([*argv, "--set", f"lora_rank={rank}", "--set", "grad_accum=2"]) == 0
        report = json.loads(capsys.readouterr().out)
        optimiser.append(report["runtimes"]["lean"]["optimiser_mib"])
        assert f"--set lora_rank={rank} --set grad_accum=2" in report["recommended"]["command"]
    assert optimiser[1] > optimiser[0]
    assert main([*argv, "--set", "lr=0.1"]) == 1
    refusal = "--set lr: plan takes model options, runtime switches, grad_accum, prompts_per_image"
    assert refusal in capsys.readouterr().err
    assert main([*argv, "--prompt", "box", "--set", "prompts_per_image=abc"]) == 1
    err = capsys.readouterr().err
    assert "prompts_per_image must be" in err and "Traceback" not in err
    assert main([*argv, "--set", "adapter_size=64"]) == 1
    assert "method lora does not take adapter_size" in capsys.readouterr().err
