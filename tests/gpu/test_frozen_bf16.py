"""``frozen_bf16`` on CUDA: the frozen encoder's matmul weights held in bfloat16 give what
their float32 originals give under bf16 autocast (which casts them to bf16 on every call),
eager and compiled, with the memory they should save; and a bf16 training run with them saves
weights of today's format.

On a CPU the suite finds the two paths bitwise equal (``tests/test_frozen_bf16.py``): the same
bf16 operands reach the same kernels. On CUDA some backward kernels (attention, cuDNN's
convolutions) accumulate in an order that varies from run to run, so the held path is compared
with the float32 path's own variation, measured by running the float32 path twice: it must be
no farther than twice that, plus 1e-4 relative, a fortieth of one bfloat16 rounding (3.9e-3),
which a weight rounded otherwise than autocast rounds it would exceed.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from cadsam import build_model
from cadsam.commands import main
from cadsam.fast.runner import fit, frozen_matmul_layers
from cadsam.fast.runtime import Runtime
from cadsam.methods.model import AdaptedSam
from cadsam.step import forward_backward

DEVICE = "cuda"
EAGER = Runtime(fused_attention=True, channels_last=True)
RUN_TO_RUN_SLACK = 1e-4
# one bfloat16 rounding that one compiled graph may make and the other not (as the tier's
# VALUE_SLACK["bf16"] in test_fast_paths.py)
COMPILED_SLACK = 4e-3


def _held(model: AdaptedSam, runtime: Runtime) -> AdaptedSam:
    return fit(copy.deepcopy(model), runtime.replace(frozen_bf16=True))


def _images(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(DEVICE).manual_seed(seed)
    images = torch.rand(batch, 3, size, size, device=DEVICE, generator=g) * 255
    ys = torch.linspace(-1, 1, size, device=DEVICE)
    masks = ((ys[:, None] ** 2 + ys[None, :] ** 2) < 0.4).float()
    return images, masks.expand(batch, 1, size, size).contiguous()


def _step(model: AdaptedSam, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logits, the frozen embeddings where the encoder runs outside autograd, and every
    trainable gradient as one vector, of one bf16 training step."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = {}
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        if model.encoder_adapter is None:
            out["embeddings"] = model.frozen_embeddings(images).float()
        with torch.no_grad():
            out["logits"] = model(images).float()
    forward_backward(model, images, masks, None, "bf16")
    trained = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    out["gradients"] = torch.cat([p.grad.double().flatten() for p in trained])
    return out


def _distance(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    return ((value.double() - reference).abs().max() / reference.abs().max()).item()


def _assert_within_run_to_run(held, first, second, slack: float = RUN_TO_RUN_SLACK) -> None:
    assert held.keys() == first.keys() == second.keys()
    for key in first:
        variation = _distance(second[key], first[key])
        assert _distance(held[key], first[key]) <= 2 * variation + slack, (key, variation)


@pytest.mark.gpu_memory(8)
@pytest.mark.parametrize(
    ("method", "backbone"),
    [
        ("cad", "vit_b"),
        ("decoder", "sam2.1_hiera_b+"),  # and SAM 2.1's conv_s0/conv_s1
        ("lora", "vit_b"),  # frozen weights inside autograd
        ("sam-adapter", "vit_b"),
        ("lora", "sam2.1_hiera_b+"),
    ],
)
def test_held_frozen_weights_give_what_float32_weights_give(method, backbone):
    torch.manual_seed(0)
    options = {"adapter_size": 128} if method == "cad" else {}
    plain = build_model(method, backbone, runtime=EAGER, **options).to(DEVICE)
    held = _held(plain, EAGER)
    assert frozen_matmul_layers(held)
    assert all(layer.weight.dtype == torch.bfloat16 for layer in frozen_matmul_layers(held))
    assert all(p.dtype == torch.float32 for p in held.parameters() if p.requires_grad)
    images, masks = _images(1, 256, seed=1)
    first, second = _step(plain, images, masks), _step(plain, images, masks)
    _assert_within_run_to_run(_step(held, images, masks), first, second)


def _requested_bytes(which: str) -> int:
    """The bytes tensors asked for: ``memory_allocated`` also counts the allocator's rounding,
    and a block that would leave under 1 MiB of its segment keeps it all, by megabytes a model."""
    return torch.cuda.memory_stats()[f"requested_bytes.all.{which}"]


@pytest.mark.gpu_memory(6)
def test_held_frozen_weights_take_half_their_memory_in_a_bf16_step():
    """CAD on ViT-B, batch 2: the encoder's frozen matmul weights on the GPU take 2 bytes a
    value instead of 4, and the step's peak falls by at least that (autocast's per-call bf16
    copies of float32 weights, transient, only add to the float32 path's peak); taking a
    state_dict (float32 throughout) allocates nothing on the GPU."""
    torch.manual_seed(2)
    runtime = EAGER.replace(adapter_tile_mib=128)
    reference = build_model("cad", "vit_b", adapter_size=128, runtime=runtime)
    saved = 2 * sum(
        p.numel() for layer in frozen_matmul_layers(reference) for p in layer.parameters()
    )
    assert saved > 150 * 2**20  # ViT-B's 86 M frozen values, most of them in these layers
    images, masks = _images(2, 256, seed=3)
    found = {}
    for name in ("float32", "bf16"):
        model = reference if name == "float32" else _held(reference, runtime)
        torch.cuda.empty_cache()
        before = _requested_bytes("current")
        model.to(DEVICE)
        weights = _requested_bytes("current") - before
        torch.cuda.reset_peak_memory_stats()
        forward_backward(model, images, masks, None, "bf16")
        found[name] = weights, _requested_bytes("peak")
        model.zero_grad(set_to_none=True)
        before = torch.cuda.memory_allocated()
        state = model.state_dict()  # float32 copies of held weights: in host memory
        assert torch.cuda.memory_allocated() == before
        assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
        del state
        model.cpu()
    (weights_32, peak_32), (weights_16, peak_16) = found["float32"], found["bf16"]
    assert weights_32 - weights_16 == pytest.approx(saved, rel=0.01)
    assert peak_32 - peak_16 >= 0.9 * saved


@pytest.mark.parametrize("backbone", ["vit_tiny", "sam2.1_hiera_tiny_test"])
def test_a_compiled_encoder_with_held_weights_gives_the_compiled_float32_embeddings(backbone):
    torch.manual_seed(4)
    runtime = EAGER.replace(compile_encoder=True)
    plain = build_model("decoder", backbone, runtime=runtime).to(DEVICE).eval()
    held = _held(plain, runtime)
    images, _ = _images(2, 256, seed=5)
    found = []
    for model in (plain, plain, held):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            found.append({"embeddings": model.frozen_embeddings(images).float()})
    _assert_within_run_to_run(found[2], found[0], found[1], COMPILED_SLACK)


def _pairs(folder, count: int) -> list[str]:
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True), masks.mkdir()
    rng = np.random.default_rng(6)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(images / f"{i}.png")
        mask = np.zeros((96, 96), np.uint8)
        mask[10 + 5 * i : 70, 20:80] = 255
        Image.fromarray(mask).save(masks / f"{i}.png")
    return ["--images", str(images), "--masks", str(masks)]


def test_a_bf16_run_with_held_weights_saves_todays_weights(tmp_path, sam_file, capsys):
    """`cadsam train --precision bf16` under auto on CUDA holds the frozen encoder in bf16 (and,
    for 4 images x 2 epochs, compiles nothing: its line says so), the step graphed where asked;
    the weights it saves have the names, shapes, dtypes and metadata of a run without it, and
    nearly its values."""
    data = _pairs(tmp_path / "data", 4)
    common = ["train", "--method", "cad", "--backbone", "vit_tiny", "--checkpoint", str(sam_file)]
    common += [*data, "--image-size", "128", "--batch-size", "2", "--epochs", "2"]
    common += ["--precision", "bf16", "--device", "cuda", "--no-progress", "--no-augment"]
    common += ["--set", "num_workers=0", "--set", "adapter_size=128", "--set", "cuda_graph=true"]
    files = {}
    for held in (True, False):
        out = tmp_path / f"run-{held}"
        assert main([*common, "--set", f"frozen_bf16={str(held).lower()}", "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert ("frozen_bf16=true" in said) is held  # the runtime's line names what differs
        assert "compilation off: 8 images do not repay its warm-up" in said
        with safe_open(str(out / "last.safetensors"), framework="pt") as f:
            meta = json.loads(f.metadata()["cadsam"])
            files[held] = meta, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    (meta_on, on), (meta_off, off) = files[True], files[False]
    del meta_on["tensors_sha256"], meta_off["tensors_sha256"]
    assert meta_on == meta_off and not meta_on["includes_base"]
    assert sorted(on) == sorted(off)
    for key in off:
        assert (on[key].dtype, on[key].shape) == (off[key].dtype, off[key].shape), key
    assert {t.dtype for t in on.values()} <= {torch.float32, torch.int64}
    moved = sum((on[k].double() - off[k].double()).square().sum() for k in off if k in on)
    scale = sum(off[k].double().square().sum() for k in off)
    assert (moved / scale).sqrt().item() < 1e-2  # two epochs of bf16 steps, run to run
