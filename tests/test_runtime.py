"""How a model runs is apart from what it trains: named runtimes, their checks, and weights
that load and predict under any runtime, old files included."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_err
from safetensors.torch import safe_open, save_file
from test_train import FAST, _isbi_subset

from cadsam import build_model
from cadsam.commands import main
from cadsam.config import TrainConfig
from cadsam.errors import CadsamError
from cadsam.fast.runtime import LEAN, ROOMY, Runtime, check_settings, resolve_runtime
from cadsam.training import train
from cadsam.weights import load_weights, save_weights


def test_named_runtimes_and_what_they_say():
    plain, said = resolve_runtime("plain", None, "cpu")
    assert plain == Runtime() and plain.is_plain and "plain" in said
    lean, said = resolve_runtime("lean", {"adapter_tile_mib": 64}, "cpu")
    assert lean == LEAN.replace(adapter_tile_mib=64) and "adapter_tile_mib=64" in said
    auto, said = resolve_runtime("auto", None, "cpu")
    assert auto == Runtime(fused_attention=True) and "auto on cpu" in said
    assert ROOMY.encoder_chunk == 0 and not ROOMY.checkpoint_encoder


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("fast", {}, "--runtime must be one of auto, plain, lean"),
        ("plain", {"warp": 1}, "unknown runtime setting warp"),
        ("plain", {"cuda_graph": "yes"}, "cuda_graph must be auto, true or false"),
        ("plain", {"adapter_tile_mib": True}, "adapter_tile_mib must be a number"),
        ("plain", {"encoder_chunk": 1.5}, "encoder_chunk must be a whole number"),
        ("lean", {"compile_blocks": True}, "does not combine with checkpoint_adapter"),
    ],
)
def test_settings_are_checked_where_given(name, settings, message):
    with pytest.raises(CadsamError, match=message):
        check_settings(name, settings)


def test_a_switch_that_cannot_apply_on_this_device_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(CadsamError, match="triton_kernels=true needs a CUDA device"):
        resolve_runtime("lean", {"triton_kernels": True}, "cpu")
    with pytest.raises(CadsamError, match="cuda_graph needs a CUDA device"):
        resolve_runtime("plain", {"cuda_graph": True}, "cpu")


def test_weights_hold_no_runtime_and_load_under_another(tmp_path, interpreted_triton):
    """Trained with the Triton kernels forced (here under Triton's interpreter), the weights
    record none of it, and load and predict on a CPU where no kernel can run."""
    data = _isbi_subset(tmp_path, 2)
    config = TrainConfig(
        method="cad",
        backbone="vit_tiny",
        out=str(tmp_path / "run"),
        images=data[1],
        masks=data[3],
        image_size=64,
        epochs=1,
        batch_size=2,
        num_workers=0,
        progress=False,
        options={"adapter_size": 32},
        runtime={"name": "lean", "triton_kernels": True, "adapter_tile_mib": 0.01},
    )
    trained = train(config)
    assert trained.runner.runtime.triton_kernels is True
    weights = tmp_path / "run" / "last.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = json.loads(f.metadata()["cadsam"])
    assert meta["options"] == {"adapter_size": 32, "cad_layout": "official"}
    out = tmp_path / "predicted"
    assert main(["predict", "--weights", str(tmp_path / "run"), "--images", data[1],
                 "--out", str(out), "--device", "cpu", "--runtime", "plain"]) == 0  # fmt: skip
    assert len(list(out.glob("*.png"))) == 2
    reloaded, _ = load_weights(weights)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        expected = trained.eval()(images)
        assert rel_err(reloaded.eval()(images), expected) < 1e-5


def test_weights_written_before_runtimes_load_and_say_what_they_ignore(tmp_path, capsys):
    """Older files kept how they were run among their options: loading ignores that, with a
    one-line note, and rebuilds the same model."""
    torch.manual_seed(0)
    model = build_model("cad", "vit_tiny", adapter_size=32)
    path = tmp_path / "new.safetensors"
    save_weights(path, model, {"name": None, "sha256": None}, 64)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["cadsam"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["options"].update(
        encoder_chunk=1, checkpoint_adapter=False, adapter_tile_mib=128, triton_kernels=True,
        compile_decoder="auto", fused_attention=True, channels_last=True,
    )  # fmt: skip
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"cadsam": json.dumps(meta)})
    loaded, _ = load_weights(old)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "triton_kernels" in note[0] and "ignored" in note[0]
    assert loaded.options == {"adapter_size": 32, "cad_layout": "official"}
    assert loaded.runner.runtime == Runtime()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model.eval()(images))


def test_eval_under_any_runtime_scores_alike(tmp_path, capsys):
    """--runtime changes how eval runs, never its scores beyond rounding."""
    data = _isbi_subset(tmp_path, 2)
    run = tmp_path / "run"
    args = ["train", "--method", "cad", "--epochs", "1", "--set", "adapter_size=32", *FAST]
    assert main([*args, *data, "--out", str(run)]) == 0
    scores = {}
    for name in ("plain", "lean", "auto"):
        capsys.readouterr()
        assert main(["eval", "--weights", str(run), *data, "--json", "--num-workers", "0",
                     "--runtime", name, "--set", "adapter_tile_mib=0.01"]) == 0  # fmt: skip
        scores[name] = json.loads(capsys.readouterr().out)
    for name in ("lean", "auto"):
        for key in ("dice", "iou", "mae"):
            assert scores[name][key] == pytest.approx(scores["plain"][key], abs=1e-4), name
    # a setting for a part the weights' method lacks changes nothing: an error, before loading
    predict = [
        "predict",
        "--weights",
        str(run),
        "--images",
        data[1],
        "--out",
        str(tmp_path / "p"),
    ]
    assert main([*predict, "--set", "checkpoint_encoder=true"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint_encoder acts on the encoder blocks that train inside autograd" in err
    assert "which method cad does not have" in err and not (tmp_path / "p").exists()


def test_eval_refuses_a_setting_for_a_part_zero_shot_lacks(capsys):
    args = ["eval", "--method", "zero-shot", "--backbone", "vit_tiny", "--random-weights"]
    assert main([*args, "--images", "i", "--masks", "m", "--set", "channels_last=true"]) == 1
    err = capsys.readouterr().err
    assert "runtime setting channels_last acts on CAD's adapter" in err
    assert "(it is for: cad)" in err and len(err.strip().splitlines()) == 1


def test_training_on_a_cpu_picks_a_cpu_sized_adapter_and_says_so(tmp_path, capsys):
    data = _isbi_subset(tmp_path, 2)
    args = ["train", "--method", "cad", "--epochs", "1", *FAST, *data]
    assert main([*args, "--image-size", "256", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "cad's adapter reads 128 x 128 images" in out
    with safe_open(str(tmp_path / "run" / "last.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["cadsam"])["options"]["adapter_size"] == 128


@pytest.mark.parametrize(
    ("free_gib", "expected", "said"),
    [
        (100, ROOMY, "fast"),
        (20, ROOMY.replace(checkpoint_encoder=True), "encoder blocks recomputed"),
        (4, LEAN, "lean"),
    ],
)
def test_auto_fits_the_gpus_free_memory(monkeypatch, free_gib, expected, said):
    """The GPU is stood in for: auto reads its free memory and name, nothing else."""
    from cadsam.fast.runtime import named_runtime

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gib * 2**30, 2**40))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Stand-in GPU")
    runtime, why = named_runtime("auto", "cuda")
    assert runtime == expected
    assert why.startswith(f"auto on Stand-in GPU ({free_gib} GiB free)") and said in why


def test_auto_graphs_the_training_steps_the_gpu_tier_checks(monkeypatch):
    """``auto`` replays a step as a CUDA graph only when training CAD on SAM's ViT or SAM 2.1
    (the steps the GPU tier checks graphed against eager) on CUDA in whole optimiser steps;
    never for other methods, outside training, under ``lean`` or on a CPU; a setting given
    stands."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * 2**30, 2**40))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Stand-in GPU")

    def graphed(name="auto", settings=None, device="cuda", *training) -> bool:
        return resolve_runtime(name, settings, device, *training)[0].cuda_graph

    cad = ("cad", "vit_h")
    runtime, said = resolve_runtime("auto", None, "cuda", cad)
    assert runtime.cuda_graph is True and "cuda_graph=true" in said
    assert graphed("auto", None, "cuda", ("cad", "sam2.1_hiera_b+")) is True
    assert graphed("auto", None, "cuda", cad, False) is False  # grad_accum or torchrun
    others = [(m, "vit_b") for m in ("decoder", "lora", "sam-adapter")]
    for training in [*others, ("lora", "sam2.1_hiera_l")]:
        assert graphed("auto", None, "cuda", training) is False, training
    assert graphed() is False  # eval, predict, cache
    assert graphed("lean", None, "cuda", cad) is False
    assert graphed("auto", {"cuda_graph": "auto"}, "cpu", cad) is False
    assert graphed("auto", {"cuda_graph": False}, "cuda", cad) is False
    assert graphed("auto", {"cuda_graph": True}, "cuda", ("decoder", "vit_b")) is True
    # with less free, still graphed where the capture fits (GraphedStep checks it); lean, not
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * 2**30, 2**40))
    assert graphed("auto", None, "cuda", cad) is True
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * 2**30, 2**40))
    assert graphed("auto", None, "cuda", cad) is False


def test_a_runtime_is_checked_however_it_is_made(monkeypatch):
    """Built directly (the Python API) as well as by name: bad values and combinations are
    errors, and kernels forced where none can run say so instead of failing in Triton."""
    with pytest.raises(CadsamError, match="compile_tiles must be auto, true or false"):
        Runtime(compile_tiles="yes")
    with pytest.raises(CadsamError, match="does not combine with checkpoint_adapter"):
        Runtime(compile_blocks=True, checkpoint_adapter=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton")
    model = build_model(
        "cad",
        "vit_tiny",
        adapter_size=32,
        runtime=Runtime(adapter_tile_mib=0.01, triton_kernels=True),
    )
    with pytest.raises(CadsamError, match="triton_kernels=true needs a CUDA device"):
        model(torch.rand(1, 3, 32, 32) * 255)
