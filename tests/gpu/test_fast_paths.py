"""Every fast path against the plain path on a CUDA GPU: fused attention, CAD's banded blocks
and Triton kernels, the compiled decoder and blocks, the CUDA-graph step, bf16 autocast and
training from cached embeddings.

Float32 on CUDA is not one arithmetic: cuDNN's convolutions use TF32 by default (10-bit
mantissa, ~1e-3 relative), cuBLAS's matrix products do where asked
(``torch.backends.cuda.matmul.allow_tf32``), and BatchNorm's sums and the LeakyReLU's kinks
amplify rounding (the plain float32 adapter's gradients are ~2e-3 from float64 without any
TF32). Where the plain path is itself approximate, both paths are measured against the plain
path in float64, and the fast path must be no farther than twice the plain path's distance
plus a slack (:data:`SLACK`) for where the plain path happens to be closer than its
precision warrants.

The ``precision`` fixture runs a test three ways: ``fp32`` (TF32 off everywhere, so the paths
differ only in the order and formulation of float32 operations), ``tf32`` (TF32 on for
convolutions and matrix products) and ``bf16`` (autocast, TF32 off).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import torch
from torch import nn

import cadsam.fast.adapter as fast_adapter
from cadsam import build_model
from cadsam.fast import fit
from cadsam.fast.graphs import adamw
from cadsam.fast.tiling import tiled_residual_block
from cadsam.methods.cad import ResidualDilatedBlock
from cadsam.methods.model import AdaptedSam
from cadsam.runtime import Runtime
from cadsam.train import forward_backward, lr_factor, segmentation_loss, training_step

DEVICE = "cuda"

# How much farther from float64 than twice the plain path's distance the fast path may be:
# fp32: float32's rounding (unit 6e-8) summed over a few thousand terms; tf32: one TF32
# rounding (unit 4.9e-4) in a product's inputs, ~1e-3 relative to the result; bf16: one
# bfloat16 rounding (unit 3.9e-3) of a result, which either path may or may not make.
VALUE_SLACK = {"fp32": 1e-5, "tf32": 1e-3, "bf16": 4e-3}
SLACK = {"fp32": 5e-3, "tf32": 1e-2, "bf16": 2e-2}
import os

CALIBRATE = os.environ.get("CALIBRATE")
# Gradients that vanish in exact arithmetic (a convolution's bias before BatchNorm, attention's
# key biases under softmax) are rounding noise in every path: each tensor is measured
# relative to its own largest value or this fraction of the largest gradient, whichever is
# larger, so that noise is compared with the model's gradient scale, not with noise.
FLOOR = 1e-3
# CAD's convolution biases, right before BatchNorm in training: their gradient vanishes in exact
# arithmetic, and each path's is rounding noise (the bands return exactly 0): these are
# measured against the largest gradient of all.
VANISHING = ("conv.bias",)
# A fast runtime without compilation (compiling is tested on its own, and costs a minute a
# graph): SDPA attention, every CAD block in bands, the first as Triton kernels, NHWC.
FAST = Runtime(
    fused_attention=True,
    encoder_chunk=1,
    adapter_tile_mib=0.5,
    triton_kernels=True,
    channels_last=True,
)
ADAPTER_SIZE = 128  # CAD's input: blocks at 128, 64 and 32 pixels, every one over 0.5 MiB


@pytest.fixture(params=["fp32", "tf32", "bf16"])
def precision(request: pytest.FixtureRequest) -> Iterator[str]:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = request.param == "tf32"
    try:
        yield request.param
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def autocast(precision: str) -> AbstractContextManager:
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16")


def generator(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)


def images_and_masks(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(seed)
    images = torch.rand(batch, 3, size, size, device=DEVICE, generator=g) * 255
    # a blob per image, so that the loss's IoU term sees a real foreground
    ys = torch.linspace(-1, 1, size, device=DEVICE)
    radius = torch.rand(batch, 1, 1, 1, device=DEVICE, generator=g) * 0.5 + 0.3
    masks = ((ys[:, None] ** 2 + ys[None, :] ** 2) < radius**2).float()
    return images, masks.expand(batch, 1, size, size).contiguous()


def embeddings_for(model: AdaptedSam, batch: int, seed: int) -> torch.Tensor:
    grid = model.sam.prompt_encoder.image_embedding_size
    return torch.randn(batch, 256, *grid, device=DEVICE, generator=generator(seed)) * 0.5


# -- distances ----------------------------------------------------------------------------------


def distance(value: torch.Tensor, exact: torch.Tensor, floor: float = 0.0) -> float:
    """Largest difference relative to the reference's largest magnitude (or ``floor``)."""
    exact = exact.double()
    scale = max(exact.abs().max().item(), floor, 1e-30)
    return (value.double() - exact).abs().max().item() / scale


def grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


VALUES = ("output", "embeddings", "logits", "loss")  # what a path computes, not its gradients


def assert_no_farther(
    fast: dict[str, torch.Tensor | None],
    plain: dict[str, torch.Tensor | None],
    exact: dict[str, torch.Tensor | None],
    precision: str,
    floor_of_largest: float = FLOOR,
    factor: float = 2.0,
) -> dict[str, tuple[float, float]]:
    """Each of ``fast`` is no farther from ``exact`` than ``factor`` times ``plain`` is, plus
    VALUE_SLACK[precision] for values (names starting with one of VALUES) and
    SLACK[precision] for gradients and running statistics; tensors without a gradient must
    lack it in every path. Returns the distances (fast, plain)."""
    assert fast.keys() == plain.keys() == exact.keys()
    largest = max(e.abs().max().item() for e in exact.values() if e is not None)
    floor = floor_of_largest * largest
    found = {}
    for name, reference in exact.items():
        if reference is None:
            assert fast[name] is None and plain[name] is None, name
            continue
        assert fast[name].shape == reference.shape, name
        floor_here = 0.0 if name.startswith(VALUES) else floor
        if name.endswith(VANISHING):  # noise in every path: measured against the largest
            floor_here = largest
        found[name] = (
            distance(fast[name], reference, floor_here),
            distance(plain[name], reference, floor_here),
        )
    if CALIBRATE:
        import json, os

        with open(os.environ["CALIBRATE"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST"), "d": found}) + "\n")
        return found
    worse = {
        name: f"fast {d_fast:.2e}, plain {d_plain:.2e}"
        for name, (d_fast, d_plain) in found.items()
        if not d_fast
        <= factor * d_plain + (VALUE_SLACK if name.startswith(VALUES) else SLACK)[precision]
    }
    assert not worse, f"farther from float64 than {factor} x the plain path ({precision}): {worse}"
    return found


def float64_twin(model: AdaptedSam) -> AdaptedSam:
    """``model`` in float64 on the plain path. The model makes its inputs float32 (images,
    the prompt encoder's coordinates): they are cast where they meet float64 weights, and the
    prompt encoder, which trains nothing and runs on constants, stays float32 (its outputs,
    rounded to float32 as in every path, then join float64 arithmetic)."""
    exact = fit(copy.deepcopy(model), Runtime()).double()
    exact.sam.prompt_encoder.float()

    def to_float64(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.double() if torch.is_tensor(a) else a for a in args)

    if exact.sam.image_encoder is not None:
        exact.sam.image_encoder.register_forward_pre_hook(to_float64)
    if exact.adapter is not None:
        exact.adapter.conv_up.register_forward_pre_hook(to_float64)
    return exact


def twin(model: AdaptedSam, runtime: Runtime) -> AdaptedSam:
    return fit(copy.deepcopy(model), runtime)


# -- 1. fused attention -------------------------------------------------------------------------


def test_fused_attention_equals_plain_attention_in_the_vit_b_encoder(precision):
    """ViT-B's encoder (windowed and global attention, relative-position tables made non-zero)
    with SDPA and the bias folded into q and k, against the explicit scores: the embeddings,
    the input's gradient and every weight's, as SAM-Adapter trains through it."""
    torch.manual_seed(0)
    model = build_model("decoder", "vit_b").to(DEVICE)
    encoder = model.sam.image_encoder
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    fused = twin(model, Runtime(fused_attention=True))
    assert all(block.attn.fused for block in fused.sam.image_encoder.blocks)
    exact = float64_twin(model)
    x = torch.randn(1, 3, 1024, 1024, device=DEVICE, generator=generator(1))
    upstream = torch.randn(1, 256, 64, 64, device=DEVICE, generator=generator(2))
    results = {}
    for name, m in (("plain", model), ("fused", fused), ("exact", exact)):
        m.sam.image_encoder.requires_grad_(True)
        leaf = x.clone().double() if name == "exact" else x.clone()
        leaf.requires_grad_(True)
        with autocast("fp32" if name == "exact" else precision):
            out = m.sam.image_encoder(leaf)
        (out.double() * upstream.double()).sum().backward()
        results[name] = {"embeddings": out.detach(), "input grad": leaf.grad}
        results[name] |= grads(m.sam.image_encoder)
        del out, leaf
    assert_no_farther(results["fused"], results["plain"], results["exact"], precision)
    # and directly: fp32 differs only in the order of operations; tf32 and bf16 round inputs
    tolerance = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}[precision]
    assert distance(results["fused"]["embeddings"], results["plain"]["embeddings"]) < tolerance


@torch.no_grad()
def test_fused_attention_gives_the_frozen_embeddings_of_plain_attention(precision):
    """The frozen encoder's path (cad, decoder, the cache): no autograd, chunked."""
    torch.manual_seed(1)
    plain = build_model("cad", "vit_b", adapter_size=ADAPTER_SIZE).to(DEVICE)
    for block in plain.sam.image_encoder.blocks:
        block.attn.rel_pos_h.normal_(0, 0.5)
        block.attn.rel_pos_w.normal_(0, 0.5)
    fused = twin(plain, Runtime(fused_attention=True, encoder_chunk=1))
    images, _ = images_and_masks(2, 256, seed=3)
    exact = float64_twin(plain).frozen_embeddings(images)
    with autocast(precision):
        found = {"plain": plain.frozen_embeddings(images), "fused": fused.frozen_embeddings(images)}
    assert_no_farther(
        {"embeddings": found["fused"]},
        {"embeddings": found["plain"]},
        {"embeddings": exact},
        precision,
    )


# -- 2, 3. CAD's blocks in bands and as Triton kernels ------------------------------------------


def block_and_conv_up(channels: int, seed: int) -> tuple[ResidualDilatedBlock, nn.Conv2d]:
    """CAD's official block (and the 1 x 1 convolution before the first), every parameter and
    BatchNorm buffer away from its initial value, so that every term matters."""
    torch.manual_seed(seed)
    block, conv_up = ResidualDilatedBlock(channels), nn.Conv2d(6, channels, 1)
    with torch.no_grad():
        block.conv.bias.uniform_(-0.5, 0.5)
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
    return block.to(DEVICE), conv_up.to(DEVICE)


def run_block_twice(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    input_grad: bool,
    modules: tuple[nn.Module, ...],
    precision: str,
) -> dict[str, torch.Tensor | None]:
    """Two training steps of a block on ``x`` and ``x / 2`` (running statistics advance twice,
    gradients add up), with a sparse upstream gradient, as a masked loss gives: both outputs,
    the input's gradient, every parameter's and buffer's."""
    leaf = x.clone().requires_grad_(input_grad)
    found = {}
    for step, scale in enumerate((1.0, 0.5)):
        with autocast(precision):
            out = run(leaf * scale)
        g = generator(10 + step)
        upstream = torch.randn(out.shape, device=DEVICE, generator=g, dtype=torch.float64)
        upstream *= torch.rand(out.shape, device=DEVICE, generator=g, dtype=torch.float64) > 0.3
        out.backward(upstream.to(out.dtype))
        found[f"output {step}"] = out.detach()
    if input_grad:
        found["input grad"] = leaf.grad
    for i, module in enumerate(modules):
        found |= {f"{i}.{k}": v for k, v in grads(module).items()}
        found |= {f"{i}.{k}": v for k, v in buffers(module).items() if v.is_floating_point()}
    return found


def assert_same_steps(modules: tuple[nn.Module, ...], plain: tuple[nn.Module, ...]) -> None:
    for module, reference in zip(modules, plain, strict=True):
        for (name, a), b in zip(module.named_buffers(), reference.buffers(), strict=True):
            if not a.is_floating_point():
                assert torch.equal(a, b), name  # num_batches_tracked


# (first block: [x, 1] convolved by the fused kernel, x needing no gradient, as the adapter's
# input; later block: x needs its gradient, written into x's own storage)
@pytest.mark.parametrize("first", [True, False], ids=["first-block", "later-block"])
def test_banded_block_equals_the_plain_block(precision, first):
    block, conv_up = block_and_conv_up(256, seed=0)
    plain = copy.deepcopy((block, conv_up))
    exact = copy.deepcopy((block, conv_up))
    for module in exact:
        module.double()
    shape = (2, 6, 48, 40) if first else (2, 256, 48, 40)
    x = torch.rand(shape, device=DEVICE, generator=generator(1)) * (1 if first else 4) - (
        0 if first else 2
    )
    x = x.contiguous(memory_format=torch.channels_last)
    rows = 10  # 5 bands of 10 rows, the last of 8: rounded to an even 10, then cropped
    if first:
        found = {
            "banded": run_block_twice(
                lambda a: tiled_residual_block(a, block, conv_up, rows),
                x,
                False,
                (block, conv_up),
                precision,
            ),
            "plain": run_block_twice(lambda a: plain[0](plain[1](a)), x, False, plain, precision),
            "exact": run_block_twice(
                lambda a: exact[0](exact[1](a)), x.double(), False, exact, "fp32"
            ),
        }
    else:
        found = {
            "banded": run_block_twice(
                lambda a: tiled_residual_block(a, block, None, rows, reuse_input=True),
                x,
                True,
                (block,),
                precision,
            ),
            "plain": run_block_twice(plain[0], x, True, plain[:1], precision),
            "exact": run_block_twice(exact[0], x.double(), True, exact[:1], "fp32"),
        }
    assert_no_farther(found["banded"], found["plain"], found["exact"], precision)
    assert_same_steps((block, conv_up), plain)


def counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Counts the calls of ``owner.name`` from now on."""
    calls = []
    function = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


# (input gradient: the kernels do the forward and backward's first pass; the bands do the
# second, which the input's gradient needs; the layout: the kernels read either by strides)
@pytest.mark.parametrize("input_grad", [False, True], ids=["no-input-grad", "input-grad"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_triton_kernels_equal_the_plain_block(monkeypatch, precision, input_grad, channels_last):
    """The first block as Triton kernels against the module, float64 and the torch bands:
    200 channels (a block of 128 and a partial one), 36 pooling cells a row (a tile of 32 and
    a partial one), two steps (running statistics, BatchNorm's sums, both weight gradients)."""
    kernels = importlib.import_module("cadsam.fast.triton_block")
    calls = {
        name: counting(monkeypatch, kernels, name)
        for name in ("moments", "output", "grad_sums", "grads")
    }
    block, conv_up = block_and_conv_up(200, seed=2)
    bands_pair = copy.deepcopy((block, conv_up))
    plain = copy.deepcopy((block, conv_up))
    exact = copy.deepcopy((block, conv_up))
    for module in exact:
        module.double()
    x = torch.rand(2, 6, 24, 72, device=DEVICE, generator=generator(3))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    found = {
        "kernels": run_block_twice(
            lambda a: tiled_residual_block(a, block, conv_up, 8, kernels=True),
            x,
            input_grad,
            (block, conv_up),
            precision,
        ),
        "bands": run_block_twice(
            lambda a: tiled_residual_block(a, *bands_pair, 8), x, input_grad, bands_pair, precision
        ),
        "plain": run_block_twice(lambda a: plain[0](plain[1](a)), x, input_grad, plain, precision),
        "exact": run_block_twice(
            lambda a: exact[0](exact[1](a)), x.double(), input_grad, exact, "fp32"
        ),
    }
    # two steps: the forward's two passes each; backward's first pass each; the second pass
    # as the weight-gradient kernel only where the bands need not compute the input's gradient
    counts = {name: len(c) for name, c in calls.items()}
    assert counts == {"moments": 2, "output": 2, "grad_sums": 2, "grads": 0 if input_grad else 2}
    assert_no_farther(found["kernels"], found["plain"], found["exact"], precision)
    assert_no_farther(found["kernels"], found["bands"], found["exact"], precision)
    assert_same_steps((block, conv_up), plain)


ADAPTER_RUNTIMES = {
    "bands": Runtime(adapter_tile_mib=0.5, channels_last=True),
    "bands-nchw": Runtime(adapter_tile_mib=0.5),
    "kernels": Runtime(adapter_tile_mib=0.5, triton_kernels=True, channels_last=True),
}


@pytest.mark.parametrize("variant", list(ADAPTER_RUNTIMES))
def test_fast_adapter_equals_the_plain_adapter(monkeypatch, precision, variant):
    """The whole adapter as a model runs it, every block in bands (the later ones over their
    predecessor's output, whose storage takes its gradient), the first as Triton kernels in
    ``kernels``: output, every gradient and running statistic over two steps."""
    banded = counting(monkeypatch, fast_adapter, "tiled_residual_block")
    if variant == "kernels":
        kernels = importlib.import_module("cadsam.fast.triton_block")
        kernel_calls = counting(monkeypatch, kernels, "output")
    torch.manual_seed(4)
    plain = build_model("cad", "vit_tiny", adapter_size=ADAPTER_SIZE, with_encoder=False)
    plain.to(DEVICE).train()
    fast = twin(plain, ADAPTER_RUNTIMES[variant])
    exact = float64_twin(plain)
    found = {}
    for name, model in (("plain", plain), ("fast", fast), ("exact", exact)):
        found[name] = {}
        for step in range(2):
            images, _ = images_and_masks(2, ADAPTER_SIZE, seed=20 + step)
            with autocast("fp32" if name == "exact" else precision):
                out = model.runner.adapter(model.adapter, images)
            upstream = torch.randn(out.shape, device=DEVICE, generator=generator(step))
            out.backward(upstream.to(out.dtype))
            found[name][f"output {step}"] = out.detach()
        found[name] |= grads(model.adapter) | buffers(model.adapter)
    assert len(banded) == 2 * 3  # every block, each step
    if variant == "kernels":
        assert len(kernel_calls) == 2  # the first block, each step
    found = {k: {n: v for n, v in f.items() if v.is_floating_point()} for k, f in found.items()}
    assert_no_farther(found["fast"], found["plain"], found["exact"], precision)
    assert_same_steps((fast.adapter,), (plain.adapter,))


# -- 4. compiled decoder and compiled blocks ----------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"], indirect=True)
def test_compiled_decoder_equals_the_plain_decoder(precision):
    """The mask decoder and the upsampling through torch.compile (what training on CUDA runs by
    default), from embeddings: the logits and every trainable gradient."""
    torch.manual_seed(5)
    plain = build_model("decoder", "vit_b", with_encoder=False).to(DEVICE)
    compiled = twin(plain, Runtime(compile_decoder=True))
    exact = float64_twin(plain)
    images, masks = images_and_masks(2, 256, seed=6)
    embeddings = embeddings_for(plain, 2, seed=7)
    found = {}
    for name, model in (("plain", plain), ("compiled", compiled), ("exact", exact)):
        given = embeddings.double() if name == "exact" else embeddings
        with autocast("fp32" if name == "exact" else precision):
            logits = model(images, given)
        segmentation_loss(logits.double(), masks.double()).backward()
        found[name] = {"logits": logits.detach()} | grads(model)
    assert "decoder" in compiled.runner.compiled
    assert_no_farther(found["compiled"], found["plain"], found["exact"], precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"], indirect=True)
def test_compiled_blocks_equal_the_plain_blocks(precision):
    """CAD's whole blocks through torch.compile (BatchNorm, LeakyReLU, the residual and the
    poolings fused around the convolution; the later blocks pool their input inside):
    output, gradients and running statistics over two steps."""
    torch.manual_seed(6)
    plain = build_model("cad", "vit_tiny", adapter_size=ADAPTER_SIZE, with_encoder=False)
    plain.to(DEVICE).train()
    compiled = twin(plain, Runtime(compile_blocks=True, channels_last=True))
    exact = float64_twin(plain)
    found = {}
    for name, model in (("plain", plain), ("compiled", compiled), ("exact", exact)):
        found[name] = {}
        for step in range(2):
            images, _ = images_and_masks(2, ADAPTER_SIZE, seed=30 + step)
            with autocast("fp32" if name == "exact" else precision):
                out = model.runner.adapter(model.adapter, images)
            upstream = torch.randn(out.shape, device=DEVICE, generator=generator(step))
            out.backward(upstream.to(out.dtype))
            found[name][f"output {step}"] = out.detach()
        found[name] |= grads(model.adapter)
        found[name] |= {k: v for k, v in buffers(model.adapter).items() if v.is_floating_point()}
    assert len(compiled.runner.compiled) == 3  # one per block
    assert_no_farther(found["compiled"], found["plain"], found["exact"], precision)
    assert_same_steps((compiled.adapter,), (plain.adapter,))


# -- 5. the CUDA-graph step ---------------------------------------------------------------------

STEPS = [2] * 6 + [1]  # six full batches, then a short one (eager: not the captured shape)


def train_steps(model: AdaptedSam, precision: str, kind: str) -> dict:
    """``STEPS`` training steps from cached embeddings under a cosine schedule. ``kind``:
    ``eager`` (multi-tensor AdamW, float learning rate), ``capturable`` (the graph's AdamW:
    fused, capturable, a tensor learning rate; launched eagerly), ``graphed`` (three eager
    steps, then captured, then replayed; the short batch eager)."""
    model.train()
    optimizer = adamw(model.trainable_parameters(), 2e-4, 0.01, graphed=kind != "eager")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor("cosine", s, len(STEPS))
    )
    step = training_step(model, optimizer, precision, graphed=kind == "graphed")
    losses = []
    for i, batch in enumerate(STEPS):
        images, masks = images_and_masks(batch, ADAPTER_SIZE, seed=40 + i)
        losses.append(step(images, masks, embeddings_for(model, batch, seed=50 + i)))
        schedule.step()
    torch.cuda.synchronize()
    return {
        "losses": torch.stack(losses).double(),
        "state": {k: v.clone() for k, v in model.trainable_state_dict().items()},
        "lr": float(optimizer.param_groups[0]["lr"]),
        "graph": getattr(step, "graph", None),
    }


def state_distances(state: dict, reference: dict) -> dict[str, float]:
    """Per floating tensor: difference norm over the reference's norm; whole-number buffers
    must be equal. CAD's convolution biases are left out: before BatchNorm their gradient is
    rounding noise, which AdamW's normalisation turns into steps of the learning rate's size
    in a random direction, so no two runs agree on them, eager or not."""
    found = {}
    for name, value in state.items():
        if not value.is_floating_point():
            assert torch.equal(value, reference[name]), name
        elif not (name.startswith("adapter.blocks.") and name.endswith("conv.bias")):
            exact = reference[name].double()
            diff = (value.double() - exact).norm().item()
            found[name] = diff / max(exact.norm().item(), 1e-12)
    return found


def total_distance(state: dict, reference: dict) -> float:
    """The norm of the difference over every floating tensor (CAD's convolution biases left
    out, as above)."""
    squares = [
        (value.double() - reference[name].double()).square().sum()
        for name, value in state.items()
        if value.is_floating_point()
        and not (name.startswith("adapter.blocks.") and name.endswith("conv.bias"))
    ]
    return torch.stack(squares).sum().sqrt().item()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_steps_follow_the_eager_steps(precision):
    """Seven steps of CAD from cached embeddings (bands, Triton kernels; ViT-B's decoder), with
    a cosine learning rate: captured on the fourth, replayed on the fifth and sixth, the short
    seventh eager. The replays must follow the schedule: a learning rate frozen at capture
    would leave the weights off by a good part of what they moved."""
    torch.manual_seed(7)
    base = build_model("cad", "vit_b", adapter_size=ADAPTER_SIZE, with_encoder=False)
    base.to(DEVICE)
    initial = {k: v.clone() for k, v in base.trainable_state_dict().items()}
    runtime = Runtime(adapter_tile_mib=0.5, triton_kernels=True, channels_last=True)
    runs = {
        kind: train_steps(twin(base, runtime), precision, kind)
        for kind in ("eager", "capturable", "graphed")
    }
    assert runs["graphed"]["graph"] is not None and runs["eager"]["graph"] is None
    assert runs["graphed"]["lr"] == runs["eager"]["lr"] == 0.0  # the cosine's end
    # The graph replays the capturable step's kernels: the two differ by the order of
    # cuDNN's float atomics in weight gradients; the eager AdamW also computes its bias
    # corrections in float64 on the CPU rather than float32 on the GPU. fp32: such
    # differences stay near float32's rounding, amplified by BatchNorm (~1e-6 of a tensor);
    # bf16: a flipped rounding in a bfloat16 activation moves a result by 3.9e-3 of itself.
    loss_tolerance = {"fp32": 1e-5, "bf16": 2e-3}[precision]
    state_tolerance = {"fp32": 1e-4, "bf16": 1e-2}[precision]
    graphed = runs["graphed"]["state"]
    moved = total_distance(graphed, initial)
    for other in ("capturable", "eager"):
        losses = runs["graphed"]["losses"], runs[other]["losses"]
        assert torch.allclose(*losses, rtol=loss_tolerance, atol=0), (other, losses)
        found = state_distances(graphed, runs[other]["state"])
        worst = max(found, key=found.get)
        print(
            "CAL5",
            precision,
            other,
            losses,
            worst,
            found[worst],
            total_distance(graphed, runs[other]["state"]) / moved,
            sorted(found.items(), key=lambda kv: -kv[1])[:4],
        )  # CAL
        assert found[worst] < state_tolerance, (other, worst, found[worst])
        # and the runs disagree by little of how far the steps moved the weights
        assert total_distance(graphed, runs[other]["state"]) < 10 * state_tolerance * moved


# -- 6. bf16 autocast against fp32 and float64 --------------------------------------------------


@pytest.mark.parametrize("runtime", [Runtime(), FAST], ids=["plain", "fast"])
def test_a_bf16_step_is_as_close_to_float64_as_bf16_allows(runtime):
    """One training step of CAD with ViT-B's encoder under bf16 autocast and in float32 (torch's
    defaults: cuDNN's convolutions in TF32), both against float64: the loss and every trainable
    gradient."""
    torch.manual_seed(8)
    fp32 = build_model("cad", "vit_b", adapter_size=ADAPTER_SIZE, runtime=runtime)
    fp32.to(DEVICE).train()
    bf16 = twin(fp32, runtime)
    exact = float64_twin(fp32)
    images, masks = images_and_masks(2, 256, seed=9)
    found = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        loss = forward_backward(model, images, masks, None, name)
        found[name] = {"loss": loss} | grads(model)
    loss = segmentation_loss(exact(images), masks.double())
    loss.backward()
    found["exact"] = {"loss": loss.detach()} | grads(exact)
    # the loss: bf16's unit roundoff (3.9e-3), averaged over many pixels; float32 with TF32
    # convolutions: one TF32 rounding (4.9e-4) at most
    assert distance(found["bf16"]["loss"], found["exact"]["loss"]) < 1e-2
    assert distance(found["fp32"]["loss"], found["exact"]["loss"]) < 1e-3
    # every gradient within a few bf16 roundings of float64 (relative to the tensor's scale,
    # or a thousandth of the largest gradient; BatchNorm amplifies rounding in the adapter),
    # and the float32 step within TF32's
    floor = FLOOR * max(g.abs().max().item() for g in found["exact"].values() if g is not None)
    print(
        "CAL6",
        runtime.describe(),
        {
            k: (
                distance(found["bf16"][n], found["exact"][n], 0 if n == "loss" else floor),
                distance(found["fp32"][n], found["exact"][n], 0 if n == "loss" else floor),
            )
            for n, k in [(n, n) for n in found["exact"] if found["exact"][n] is not None]
        },
    )  # CAL
    for name, exact_grad in found["exact"].items():
        if exact_grad is None:
            assert found["bf16"][name] is None and found["fp32"][name] is None, name
            continue
        assert distance(found["bf16"][name], exact_grad, floor) < 1e-1, name
        assert distance(found["fp32"][name], exact_grad, floor) < 2e-2, name


# -- 7. cached embeddings -----------------------------------------------------------------------


def test_a_step_from_cached_embeddings_equals_a_step_with_the_encoder():
    """CAD built without its encoder, given the frozen encoder's embeddings, trains as CAD with
    the encoder does: two steps, the losses and every trained tensor."""
    torch.manual_seed(10)
    full = build_model("cad", "vit_b", adapter_size=ADAPTER_SIZE, runtime=FAST).to(DEVICE)
    cached = build_model(
        "cad", "vit_b", adapter_size=ADAPTER_SIZE, with_encoder=False, runtime=FAST
    ).to(DEVICE)
    missing, unexpected = cached.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith("sam.image_encoder.") for k in unexpected)
    runs = {}
    for name, model in (("full", full), ("cached", cached)):
        model.train()
        optimizer = adamw(model.trainable_parameters(), 2e-4, 0.01)
        step = training_step(model, optimizer, "fp32")
        losses = []
        for i in range(2):
            images, masks = images_and_masks(2, 256, seed=60 + i)
            embeddings = full.frozen_embeddings(images) if name == "cached" else None
            losses.append(step(images, masks, embeddings))
        runs[name] = (torch.stack(losses), model.trainable_state_dict())
    # the same kernels on the same values, but for the order of cuDNN's float atomics in
    # weight gradients (and AdamW turning noise-level gradients into whole steps: the
    # convolution biases before BatchNorm are left out)
    found = state_distances(runs["cached"][1], runs["full"][1])
    worst = max(found, key=found.get)
    print("CAL7", runs["cached"][0], runs["full"][0], worst, found[worst])  # CAL
    assert torch.allclose(runs["cached"][0], runs["full"][0], rtol=1e-5, atol=0)
    assert found[worst] < 1e-4, (worst, found[worst])
