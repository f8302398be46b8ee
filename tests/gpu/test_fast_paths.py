"""Every fast path against the plain path on a CUDA GPU: fused attention, CAD's banded blocks
and Triton kernels, the compiled encoder, decoder and blocks, the CUDA-graph step, bf16
autocast, training from cached embeddings and encoder blocks recomputed in backward; on SAM's
ViT and, for the paths that SAM 2.1 runs, on Hiera.

Float32 on CUDA is not one arithmetic: cuDNN's convolutions use TF32 by default (10-bit
mantissa, ~1e-3 relative), cuBLAS's matrix products where asked
(``torch.backends.cuda.matmul.allow_tf32``). And CAD's gradients are ill-conditioned in any
float32: BatchNorm removes a per-channel mean several times the deviations it normalises, so
a weight gradient is a float32 sum over ~10^4 pixels that cancels to a small remainder, and
each path's order of summation leaves ~1e-3 of it (the plain adapter's gradients are 2e-3 from
float64 with TF32 off on an H100; on a CPU, the plain and the banded path are each the worse
one by 100x, depending on the layout). So the paths are not compared with each other but with
the plain path in float64: the fast path must be no farther from it than twice the plain
path's distance, plus a slack for where the plain path happens to be closer than its precision
warrants (:func:`slack`).

The ``precision`` fixture runs a test three ways: ``fp32`` (TF32 off everywhere, so the paths
differ only in the order and formulation of float32 operations), ``tf32`` (TF32 on for
convolutions and matrix products) and ``bf16`` (autocast, TF32 off).
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import cadsam.fast.adapter as fast_adapter
import cadsam.fast.runner
from cadsam import build_model
from cadsam.fast.graphs import adamw
from cadsam.fast.runner import fit
from cadsam.fast.runtime import Runtime
from cadsam.fast.tiling import tiled_residual_block
from cadsam.methods.cad import ResidualDilatedBlock
from cadsam.methods.lora import encoder_blocks
from cadsam.methods.model import AdaptedSam, PlainRunner
from cadsam.step import forward_backward, segmentation_loss, training_step
from cadsam.training import lr_factor

DEVICE = "cuda"

# The slack, by precision, for...
# values (outputs, embeddings, logits) and BatchNorm's running statistics, which are well
# conditioned: fp32, float32's rounding (unit 6e-8) over a few hundred operations; tf32, one
# TF32 rounding (unit 4.9e-4) of a product's inputs, ~1e-3 of its result; bf16, one bfloat16
# rounding (unit 3.9e-3), which one path may make and the other not
VALUE_SLACK = {"fp32": 1e-5, "tf32": 1e-3, "bf16": 4e-3}
# gradients without BatchNorm (encoder, decoder): as values, a few times over (a backward pass
# is two or three products for each of the forward's)
GRAD_SLACK = {"fp32": 1e-4, "tf32": 3e-3, "bf16": 1e-2}
# gradients through BatchNorm (CAD's adapter): the cancellation above, ~1e-3 in float32,
# observed up to 4.3e-3 in one path while the other was at 1.6e-4; TF32's and bfloat16's
# rounding in the summed products, ~1e-2 (observed 2e-2 to 8e-2 in both paths in bfloat16)
BN_GRAD_SLACK = {"fp32": 1e-2, "tf32": 3e-2, "bf16": 3e-2}
# Gradients are measured relative to the tensor's own largest value or this fraction of the
# model's largest gradient, whichever is larger: a tensor of gradients far below the others
# carries their rounding, which is compared with the model's gradient scale, not with itself.
FLOOR = 1e-3
# Gradients that vanish in exact arithmetic, rounding noise in every path (the bands give
# exactly 0): CAD's convolution biases before BatchNorm (in training, BatchNorm subtracts them
# again) and the decoder's key biases (softmax ignores what adds the same to every score).
# Measured against the largest gradient of all.
VANISHING = ("conv.bias", "k_proj.bias")
VALUES = ("output", "embeddings", "logits", "loss")  # what a path computes, not gradients
STATISTICS = ("running_mean", "running_var")
# A fast runtime without compilation (compiling is tested on its own, and costs tens of
# seconds a graph): SDPA attention, every CAD block in bands, the first as Triton kernels, NHWC.
FAST = Runtime(
    fused_attention=True,
    encoder_chunk=1,
    adapter_tile_mib=0.5,
    triton_kernels=True,
    channels_last=True,
)
ADAPTER_SIZE = 128  # CAD's input: blocks at 128, 64 and 32 pixels, each over 0.5 MiB a batch


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for float32 convolutions and matrix products on or off, restored after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@pytest.fixture(params=["fp32", "tf32", "bf16"])
def precision(request: pytest.FixtureRequest) -> Iterator[str]:
    with tf32(request.param == "tf32"):
        yield request.param


def autocast(precision: str) -> AbstractContextManager:
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16")


def generator(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)


def images_and_masks(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(seed)
    images = torch.rand(batch, 3, size, size, device=DEVICE, generator=g) * 255
    # a disc per image, so that the loss's IoU term sees a real foreground
    ys = torch.linspace(-1, 1, size, device=DEVICE)
    radius = torch.rand(batch, 1, 1, 1, device=DEVICE, generator=g) * 0.5 + 0.3
    masks = ((ys[:, None] ** 2 + ys[None, :] ** 2) < radius**2).float()
    return images, masks.expand(batch, 1, size, size).contiguous()


def embeddings_for(model: AdaptedSam, batch: int, seed: int) -> torch.Tensor:
    """Cache rows as the model's decoder reads them (SAM 2.1's: embedding and maps packed)."""
    shape = (batch, *model.layout.shape)
    return torch.randn(shape, device=DEVICE, generator=generator(seed)) * 0.5


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


def statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm's running statistics (``num_batches_tracked``: :func:`assert_same_counts`)."""
    return {
        name: b.detach().clone() for name, b in module.named_buffers() if name.endswith(STATISTICS)
    }


def slack(name: str, precision: str, grad_slack: dict[str, float]) -> float:
    values = name.startswith(VALUES) or name.endswith(STATISTICS)
    return (VALUE_SLACK if values else grad_slack)[precision]


def assert_no_farther(
    fast: dict[str, torch.Tensor | None],
    plain: dict[str, torch.Tensor | None],
    exact: dict[str, torch.Tensor | None],
    precision: str,
    grad_slack: dict[str, float] = BN_GRAD_SLACK,
) -> None:
    """Each of ``fast`` is no farther from ``exact`` than twice ``plain`` is, plus the slack
    for its kind: VALUE_SLACK for values (names starting with one of VALUES) and running
    statistics, ``grad_slack`` for gradients. A tensor without a gradient must lack it in
    every path."""
    assert fast.keys() == plain.keys() == exact.keys()
    largest = max(e.abs().max().item() for e in exact.values() if e is not None)
    worse = {}
    for name, reference in exact.items():
        if reference is None:
            assert fast[name] is None and plain[name] is None, name
            continue
        assert fast[name].shape == reference.shape, name
        if name.endswith(VANISHING):
            floor = largest
        elif name.startswith(VALUES) or name.endswith(STATISTICS):
            floor = 0.0
        else:
            floor = FLOOR * largest
        d_fast = distance(fast[name], reference, floor)
        d_plain = distance(plain[name], reference, floor)
        if not d_fast <= 2 * d_plain + slack(name, precision, grad_slack):
            worse[name] = f"fast {d_fast:.2e}, plain {d_plain:.2e}"
    assert not worse, f"farther from float64 than 2 x the plain path ({precision}): {worse}"


class OneImageAtATime(PlainRunner):
    """The plain path, its frozen encoder run on one image at a time: the same function, and
    in float64 the explicit attention scores of one image (ViT-B's global blocks: 1.6 GiB a
    copy), not of the batch."""

    def frozen_embeddings(self, model: AdaptedSam, images: torch.Tensor) -> torch.Tensor:
        one = super().frozen_embeddings  # not in the comprehension: its scope has no self
        return torch.cat([one(model, image) for image in images.split(1)])


def recomputed_in_backward(blocks: Iterable[nn.Module]) -> None:
    """Each block's activations recomputed in backward rather than kept (explicit attention
    keeps GiBs per global block): the same arithmetic, so that the tier's heaviest tests fit a
    24 GiB card's share (tests/gpu/budget.py)."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def float64_twin(model: AdaptedSam) -> AdaptedSam:
    """``model`` in float64 on the plain path (its frozen encoder an image at a time). The
    model makes its inputs float32 (images, the prompt encoder's coordinates): they are cast
    where they meet float64 weights, and the prompt encoder, which trains nothing and runs on
    constants, stays float32 (its outputs, rounded to float32 as in every path, then join
    float64 arithmetic)."""
    exact = fit(copy.deepcopy(model), Runtime()).double()
    exact.runner = OneImageAtATime()
    exact.sam.prompt_encoder.float()

    def to_float64(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.double() if torch.is_tensor(a) else a for a in args)

    if exact.sam.image_encoder is not None:
        exact.sam.image_encoder.register_forward_pre_hook(to_float64)
    if exact.adapter is not None:
        exact.adapter.conv_up.register_forward_pre_hook(to_float64)
    return exact


def twin(model: AdaptedSam, runtime: Runtime) -> AdaptedSam:
    """A copy of ``model`` (the same weights and buffers) that runs as ``runtime`` says."""
    return fit(copy.deepcopy(model), runtime)


# -- 1. fused attention -------------------------------------------------------------------------


@pytest.mark.gpu_memory(10)
def test_fused_attention_equals_plain_attention_in_the_vit_b_encoder(precision):
    """ViT-B's encoder (windowed and global attention, relative-position tables made non-zero)
    with SDPA and the bias folded into q and k, against the explicit scores: the embeddings,
    the input's gradient and every weight's, as SAM-Adapter trains through it. Every pass's
    blocks are recomputed in backward (the same arithmetic) and one model at a time is on the
    GPU: kept, one 1024 x 1024 image's pass peaks near 8 GiB in float32 and 16 in float64;
    so, near 6 (the float64 pass), which a 24 GiB card's share of the tier holds."""
    torch.manual_seed(0)
    model = build_model("decoder", "vit_b")
    with torch.no_grad():
        for block in model.sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    fused = twin(model, Runtime(fused_attention=True))
    assert all(block.attn.fused for block in fused.sam.image_encoder.blocks)
    assert not any(block.attn.fused for block in model.sam.image_encoder.blocks)
    exact = float64_twin(model)
    for m in (model, fused, exact):  # after the twins are copied
        recomputed_in_backward(m.sam.image_encoder.blocks)
    x = torch.randn(1, 3, 1024, 1024, device=DEVICE, generator=generator(1))
    upstream = torch.randn(1, 256, 64, 64, device=DEVICE, generator=generator(2))
    found = {}
    for name, m in (("plain", model), ("fused", fused), ("exact", exact)):
        encoder = m.sam.image_encoder.to(DEVICE).requires_grad_(True)
        leaf = (x.double() if name == "exact" else x.clone()).requires_grad_(True)
        with autocast("fp32" if name == "exact" else precision):
            out = encoder(leaf)
        (out.double() * upstream.double()).sum().backward()
        result = {"embeddings": out.detach(), "input grad": leaf.grad} | grads(encoder)
        found[name] = {k: None if v is None else v.cpu() for k, v in result.items()}
        encoder.zero_grad(set_to_none=True)
        encoder.cpu()
        del out, leaf, result
        torch.cuda.empty_cache()  # the next pass allocates blocks of other sizes
    assert_no_farther(found["fused"], found["plain"], found["exact"], precision, GRAD_SLACK)
    if precision == "fp32":  # the same precision in another order: directly, too
        assert distance(found["fused"]["embeddings"], found["plain"]["embeddings"]) < 1e-4


@pytest.mark.gpu_memory(8)
@torch.no_grad()
def test_fused_attention_gives_the_frozen_embeddings_of_plain_attention(precision):
    """The frozen encoder's path (cad, decoder, the cache): outside autograd, an image at a
    time, from images at data resolution."""
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


def in_float64(modules: tuple[nn.Module, ...]) -> tuple[nn.Module, ...]:
    return tuple(copy.deepcopy(module).double() for module in modules)


def run_block_twice(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    input_grad: bool,
    modules: tuple[nn.Module, ...],
    precision: str,
) -> dict[str, torch.Tensor | None]:
    """Two training steps of a block on ``x`` and ``x / 2`` (running statistics advance twice,
    gradients add up), with a sparse upstream gradient, as a masked loss gives: both outputs,
    the input's gradient, every parameter's gradient and running statistic."""
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
        found |= {f"{i}.{k}": v for k, v in (grads(module) | statistics(module)).items()}
    return found


def assert_same_counts(modules: tuple[nn.Module, ...], plain: tuple[nn.Module, ...]) -> None:
    """BatchNorm counted the same steps in both."""
    for module, reference in zip(modules, plain, strict=True):
        for (name, a), b in zip(module.named_buffers(), reference.buffers(), strict=True):
            if not a.is_floating_point():
                assert torch.equal(a, b), name


# (first block: [x, 1] convolved by the fused kernel, x needing no gradient, as the adapter's
# input; later block: x needs its gradient, written into x's own storage)
@pytest.mark.parametrize("first", [True, False], ids=["first-block", "later-block"])
def test_banded_block_equals_the_plain_block(precision, first):
    """256 channels, bands of 10 rows (the last of 8), NHWC, two steps: outputs, the input's
    gradient, every parameter's, running statistics."""
    block, conv_up = block_and_conv_up(256, seed=0)
    plain = copy.deepcopy((block, conv_up))
    exact = in_float64((block, conv_up))
    if first:
        x = torch.rand(2, 6, 48, 40, device=DEVICE, generator=generator(1))
    else:
        x = torch.randn(2, 256, 48, 40, device=DEVICE, generator=generator(1))
    x = x.contiguous(memory_format=torch.channels_last)
    rows = 10
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
    assert_same_counts((block, conv_up), plain)


def counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Counts the calls of ``owner.name`` from now on."""
    calls = []
    function = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


# (an input that needs a gradient is left to the bands, every pass: BatchNorm's backward needs
# the forward's own convolution, and TF32 rounds differently in Triton and cuDNN; the layout:
# the kernels read either by strides)
@pytest.mark.parametrize("input_grad", [False, True], ids=["no-input-grad", "input-grad"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_triton_kernels_equal_the_plain_block(monkeypatch, precision, input_grad, channels_last):
    """The first block as Triton kernels against the module, float64 and the torch bands:
    200 channels (a program's 128 and a partial block), 36 pooling cells a row (a tile of 32
    and a partial one), two steps (running statistics, BatchNorm's sums, both weight
    gradients)."""
    kernels = importlib.import_module("cadsam.fast.triton_block")
    passes = ("moments", "output", "grad_sums", "grads")
    calls = {name: counting(monkeypatch, kernels, name) for name in passes}
    block, conv_up = block_and_conv_up(200, seed=2)
    bands = copy.deepcopy((block, conv_up))
    plain = copy.deepcopy((block, conv_up))
    exact = in_float64((block, conv_up))
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
            lambda a: tiled_residual_block(a, *bands, 8), x, input_grad, bands, precision
        ),
        "plain": run_block_twice(lambda a: plain[0](plain[1](a)), x, input_grad, plain, precision),
        "exact": run_block_twice(
            lambda a: exact[0](exact[1](a)), x.double(), input_grad, exact, "fp32"
        ),
    }
    # each step, where the input needs no gradient: the forward's two passes, backward's two
    counts = {name: len(c) for name, c in calls.items()}
    assert counts == dict.fromkeys(passes, 0 if input_grad else 2)
    assert_no_farther(found["kernels"], found["plain"], found["exact"], precision)
    assert_no_farther(found["kernels"], found["bands"], found["exact"], precision)
    assert_same_counts((block, conv_up), plain)


ADAPTER_RUNTIMES = {
    "bands": Runtime(adapter_tile_mib=0.5, channels_last=True),
    "bands-nchw": Runtime(adapter_tile_mib=0.5),
    "kernels": Runtime(adapter_tile_mib=0.5, triton_kernels=True, channels_last=True),
}


def adapter_steps(model: AdaptedSam, precision: str, seed: int) -> dict[str, torch.Tensor]:
    """Two training steps of the model's adapter as the model runs it (its runner), on
    images at the adapter's size: both outputs, every gradient and running statistic."""
    found = {}
    for step in range(2):
        images, _ = images_and_masks(2, ADAPTER_SIZE, seed=seed + step)
        with autocast(precision):
            out = model.runner.adapter(model.adapter, images)
        upstream = torch.randn(out.shape, device=DEVICE, generator=generator(seed + 10 + step))
        out.backward(upstream.to(out.dtype))
        found[f"output {step}"] = out.detach()
    return found | grads(model.adapter) | statistics(model.adapter)


@pytest.mark.parametrize("variant", list(ADAPTER_RUNTIMES))
def test_fast_adapter_equals_the_plain_adapter(monkeypatch, precision, variant):
    """The whole adapter as a model runs it, every block in bands (the later ones over their
    predecessor's output, whose storage takes its gradient), the first as Triton kernels in
    ``kernels``: outputs, every gradient and running statistic over two steps."""
    banded = counting(monkeypatch, fast_adapter, "tiled_residual_block")
    if variant == "kernels":
        kernels = importlib.import_module("cadsam.fast.triton_block")
        kernel_calls = counting(monkeypatch, kernels, "output")
    torch.manual_seed(4)
    plain = build_model("cad", "vit_tiny", adapter_size=ADAPTER_SIZE, with_encoder=False)
    plain.to(DEVICE).train()
    fast = twin(plain, ADAPTER_RUNTIMES[variant])
    exact = float64_twin(plain)
    found = {
        "plain": adapter_steps(plain, precision, seed=20),
        "fast": adapter_steps(fast, precision, seed=20),
        "exact": adapter_steps(exact, "fp32", seed=20),
    }
    assert len(banded) == 2 * 3  # every block, each step
    if variant == "kernels":
        assert len(kernel_calls) == 2  # the first block, each step
    assert_no_farther(found["fast"], found["plain"], found["exact"], precision)
    assert_same_counts((fast.adapter,), (plain.adapter,))


# -- 4. compiled encoder, decoder and blocks ----------------------------------------------------


@pytest.mark.parametrize("backbone", ["vit_tiny", "sam2.1_hiera_tiny_test"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"], indirect=True)
@torch.no_grad()
def test_compiled_encoder_gives_the_frozen_embeddings_of_the_plain_encoder(precision, backbone):
    """The frozen encoder through torch.compile, the whole batch in one call (what training CAD
    or the decoder on CUDA runs by default, and ``cache --compile``): the embeddings, with
    SAM 2.1's high-resolution maps. Small configurations: the compiled code is the same."""
    torch.manual_seed(11)
    plain = build_model("decoder", backbone).to(DEVICE).train()
    compiled = twin(plain, Runtime(fused_attention=True, compile_encoder=True))
    images, _ = images_and_masks(2, 256, seed=12)
    exact = float64_twin(plain).frozen_embeddings(images)
    with autocast(precision):
        found = {
            name: m.frozen_embeddings(images)
            for name, m in (("plain", plain), ("compiled", compiled))
        }
    assert "encoder" in compiled.runner.compiled
    assert_no_farther(
        {"embeddings": found["compiled"]},
        {"embeddings": found["plain"]},
        {"embeddings": exact},
        precision,
    )


@pytest.mark.parametrize("backbone", ["vit_b", "sam2.1_hiera_b+"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"], indirect=True)
def test_compiled_decoder_equals_the_plain_decoder(precision, backbone):
    """The mask decoder and the upsampling through torch.compile (what training on CUDA runs by
    default), from embeddings (SAM 2.1's with its high-resolution maps): the logits and every
    trainable gradient."""
    torch.manual_seed(5)
    plain = build_model("decoder", backbone, with_encoder=False).to(DEVICE)
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
    assert_no_farther(found["compiled"], found["plain"], found["exact"], precision, GRAD_SLACK)


@pytest.mark.parametrize("precision", ["fp32", "bf16"], indirect=True)
def test_compiled_blocks_equal_the_plain_blocks(precision):
    """CAD's whole blocks through torch.compile (BatchNorm, LeakyReLU, the residual and the
    poolings fused around the convolution; the later blocks pool their input inside):
    outputs, gradients and running statistics over two steps."""
    torch.manual_seed(6)
    plain = build_model("cad", "vit_tiny", adapter_size=ADAPTER_SIZE, with_encoder=False)
    plain.to(DEVICE).train()
    compiled = twin(plain, Runtime(compile_blocks=True, channels_last=True))
    exact = float64_twin(plain)
    found = {
        "plain": adapter_steps(plain, precision, seed=30),
        "compiled": adapter_steps(compiled, precision, seed=30),
        "exact": adapter_steps(exact, "fp32", seed=30),
    }
    assert len(compiled.runner.compiled) == 3  # one per block
    assert_no_farther(found["compiled"], found["plain"], found["exact"], precision)
    assert_same_counts((compiled.adapter,), (plain.adapter,))


# -- 5. the CUDA-graph step ---------------------------------------------------------------------

STEPS = [2] * 6 + [1]  # six full batches, then a short one (eager: not the captured shape)


def train_steps(
    model: AdaptedSam, precision: str, kind: str, log: Callable[[str], None] = print
) -> dict:
    """``STEPS`` training steps under a cosine schedule, from cached embeddings where the
    model has no encoder, else through its frozen encoder. ``kind``:
    ``eager`` (multi-tensor AdamW, float learning rate), ``capturable`` (the graph's AdamW:
    fused, capturable, a tensor learning rate; launched eagerly), ``graphed`` (three eager
    steps, then captured, then replayed; the short batch eager), ``if-it-fits`` (graphed as
    ``cuda_graph=auto`` graphs it: eager where the capture would not fit, which ``log`` says)."""
    model.train()
    optimizer = adamw(model.trainable_parameters(), 2e-4, 0.01, graphed=kind != "eager")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor("cosine", s, len(STEPS))
    )
    graphed, fit = kind in ("graphed", "if-it-fits"), kind == "if-it-fits"
    step = training_step(model, optimizer, precision, graphed, only_if_it_fits=fit, log=log)
    losses, cached = [], model.sam.image_encoder is None
    for i, batch in enumerate(STEPS):
        images, masks = images_and_masks(batch, ADAPTER_SIZE, seed=40 + i)
        embeddings = embeddings_for(model, batch, seed=50 + i) if cached else None
        losses.append(step(images, masks, embeddings))
        schedule.step()
    torch.cuda.synchronize()
    return {
        "losses": torch.stack(losses).double(),
        "state": {k: v.clone() for k, v in model.trainable_state_dict().items()},
        "lr": float(optimizer.param_groups[0]["lr"]),
        "graph": getattr(step, "graph", None),
    }


# A trained tensor moves ~1e-2 of itself in these steps (AdamW's lr, 2e-4 an element); one
# moved only by weight decay, ~1e-5: its distance is taken against 1e-4 of itself instead.
MOVEMENT_FLOOR = 1e-4


def disagreement(state: dict, reference: dict, initial: dict) -> tuple[dict[str, float], float]:
    """How far ``state`` is from ``reference``, relative to how far ``reference`` moved from
    ``initial`` in training: per tensor, and over all of them. Whole-number buffers
    (BatchNorm's step counts) must be equal. Left out: the gradients that vanish in exact
    arithmetic (VANISHING), rounding noise that AdamW's normalisation turns into steps in a
    random direction, on which no two runs agree. Relative to the movement, not the tensor:
    a tensor that starts at zero (a BatchNorm bias) is all movement; and CAD's gradients
    through BatchNorm change by ~1e-3 of themselves for any change in the last bit of the
    weights (see the module's notes), so runs drift apart by ~1e-3 of what they moved, not
    of what the weights are. But at least by MOVEMENT_FLOOR of what they are: a tensor the
    loss does not reach (the hypernetworks of the mask tokens a single mask leaves unused)
    moves by weight decay alone, lr·wd ≈ 2e-6 of itself a step, within which float32's
    rounding of the weight itself (6e-8 a step, in another order in each run) is ~1e-2."""
    per_tensor, differences, movements = {}, 0.0, 0.0
    for name, value in state.items():
        if not value.is_floating_point():
            assert torch.equal(value, reference[name]), name
            continue
        if name.endswith(VANISHING):
            continue
        difference = (value.double() - reference[name].double()).norm().item()
        moved = (reference[name].double() - initial[name].double()).norm().item()
        floor = MOVEMENT_FLOOR * reference[name].double().norm().item()
        per_tensor[name] = difference / max(moved, floor, 1e-30)
        differences += difference**2
        movements += moved**2
    return per_tensor, (differences / movements) ** 0.5


@pytest.mark.parametrize("backbone", ["vit_b", "sam2.1_hiera_b+"])
@pytest.mark.parametrize("source", ["cache", "encoder"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_steps_follow_the_eager_steps(precision, source, backbone):
    """Seven steps of CAD (bands, Triton kernels; the backbone's decoder), from cached
    embeddings or through the backbone's frozen encoder, with a cosine learning rate: captured
    on the fourth, replayed on the fifth and sixth, the short seventh eager; against the same
    steps launched eagerly, with the graph's optimiser and with the eager one: what lets
    ``auto`` graph the step on each backbone family (runtime.GRAPHED_STEPS)."""
    torch.manual_seed(7)
    with_encoder = source == "encoder"
    base = build_model("cad", backbone, adapter_size=ADAPTER_SIZE, with_encoder=with_encoder)
    base.to(DEVICE)
    initial = {k: v.clone() for k, v in base.trainable_state_dict().items()}
    # fused attention, as every runtime that graphs the step runs it: ViT-B's explicit scores
    # for two images would hold GiBs in the graph's pool and again in the warm-up's cache
    runtime = Runtime(
        fused_attention=True, adapter_tile_mib=0.5, triton_kernels=True, channels_last=True
    )
    runs = {
        kind: train_steps(twin(base, runtime), precision, kind)
        for kind in ("eager", "capturable", "graphed")
    }
    assert runs["graphed"]["graph"] is not None and runs["capturable"]["graph"] is None
    assert runs["graphed"]["lr"] == runs["eager"]["lr"] == 0.0  # the cosine's end
    # The graph replays the capturable step's kernels: the two differ by the order of float
    # atomics (cuDNN's weight gradients, the upsampling's backward); the eager AdamW also
    # computes its bias corrections in float64 on the CPU, not float32 on the GPU. Losses:
    # fp32, float32's rounding (~1e-7 of a mean); bf16, a rounding that flips in a bfloat16
    # activation (3.9e-3 of it), averaged over the batch. Weights: see disagreement(); in
    # bf16 the gradients' changes are bfloat16's, ~1e-2, and BatchNorm's biases move little.
    # In fp32 the adapter's first conv (the one that reads the image) drifts furthest: the
    # loss's gradient reaches it through every band's BatchNorm, each step's drift
    # compounding. On an H200 it drifted 1.15e-2 of its movement from the capturable run's
    # through ViT-B's encoder, and 1.0003e-2 from the cache (in other runs, under 1e-2). Its
    # losses then differ by what that drift moves them: the loss falls ~0.2 over the steps,
    # and the eager run's fifth was 7e-5 of itself from the graphed one's (from the cache,
    # within 1e-5). A learning rate frozen at capture moves the sixth by ~5e-3.
    loss_tolerance = {"fp32": 2e-4 if with_encoder else 1e-5, "bf16": 2e-3}[precision]
    per_tensor_tolerance = {"fp32": 3e-2, "bf16": 2e-1}[precision]
    # Over all tensors: a learning rate frozen at capture (0.61 of the initial one) on the
    # two replays, instead of the cosine's 0.39 and 0.19, would put the weights 16 % of their
    # movement off; a step that does not replay, more.
    total_tolerance = {"fp32": 1e-3, "bf16": 5e-2}[precision]
    graphed = runs["graphed"]["state"]
    for other in ("capturable", "eager"):
        losses = runs["graphed"]["losses"], runs[other]["losses"]
        assert torch.allclose(*losses, rtol=loss_tolerance, atol=0), (other, losses)
        per_tensor, total = disagreement(graphed, runs[other]["state"], initial)
        worst = max(per_tensor, key=per_tensor.get)
        assert per_tensor[worst] < per_tensor_tolerance and total < total_tolerance, (
            other,
            worst,
            per_tensor[worst],
            total,
        )


def test_auto_graphs_the_step_only_where_its_capture_fits(monkeypatch):
    """``cuda_graph=auto`` on this GPU: the capture fits, and the step is graphed. On a GPU
    stood in for with 1 MiB free (the driver's reading; the step's pool needs more): every
    step eager, one line saying why, and the run the capturable optimiser's eager run, no
    step lost or repeated (bounds: test_graphed_steps_follow_the_eager_steps, from the
    cache in fp32)."""
    torch.manual_seed(7)
    base = build_model("cad", "vit_b", adapter_size=ADAPTER_SIZE, with_encoder=False)
    base.to(DEVICE)
    initial = {k: v.clone() for k, v in base.trainable_state_dict().items()}
    runtime = Runtime(adapter_tile_mib=0.5, triton_kernels=True, channels_last=True)
    said: list[str] = []
    fits = train_steps(twin(base, runtime), "fp32", "if-it-fits", said.append)
    assert fits["graph"] is not None and said == []
    total = torch.cuda.mem_get_info()[1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (2**20, total))
    declined = train_steps(twin(base, runtime), "fp32", "if-it-fits", said.append)
    assert declined["graph"] is None and len(said) == 1 and "stay eager" in said[0], said
    monkeypatch.undo()
    eager = train_steps(twin(base, runtime), "fp32", "capturable")
    assert declined["lr"] == eager["lr"] == 0.0  # the cosine's end: every step taken
    losses = declined["losses"], eager["losses"]
    assert torch.allclose(*losses, rtol=1e-5, atol=0), losses
    per_tensor, total_off = disagreement(declined["state"], eager["state"], initial)
    assert max(per_tensor.values()) < 3e-2 and total_off < 1e-3, (per_tensor, total_off)


# -- 6. bf16 autocast against fp32 and float64 --------------------------------------------------


def norm_distance(value: torch.Tensor, exact: torch.Tensor, floor: float = 0.0) -> float:
    """The difference's norm over the reference's norm (or ``floor``)."""
    exact = exact.double()
    return (value.double() - exact).norm().item() / max(exact.norm().item(), floor, 1e-30)


@pytest.mark.gpu_memory(8)
@pytest.mark.parametrize("runtime", [Runtime(), FAST], ids=["plain", "fast"])
def test_a_bf16_step_is_as_close_to_float64_as_bf16_allows(runtime):
    """One training step of CAD with ViT-B's encoder, under bf16 autocast and in float32 (TF32
    off), against float64: the loss and every trainable gradient. Per tensor by norms (not
    the largest element, which bf16 leaves to chance), relative to the tensor's norm or a
    thousandth of the largest gradient norm."""
    torch.manual_seed(8)
    fp32 = build_model("cad", "vit_b", adapter_size=ADAPTER_SIZE, runtime=runtime)
    fp32.to(DEVICE).train()
    bf16 = twin(fp32, runtime)
    exact = float64_twin(fp32)
    images, masks = images_and_masks(2, 256, seed=9)
    found = {}
    with tf32(False):
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            loss = forward_backward(model, images, masks, None, name)
            found[name] = {"loss": loss} | grads(model)
    loss = segmentation_loss(exact(images), masks.double())
    loss.backward()
    found["exact"] = {"loss": loss.detach()} | grads(exact)
    # the loss: a mean over 131,072 pixels of terms each a few bf16 roundings (3.9e-3) off,
    # which mostly cancel; float32: its rounding (6e-8) over the forward pass
    assert norm_distance(found["bf16"]["loss"], found["exact"]["loss"]) < 1e-2
    assert norm_distance(found["fp32"]["loss"], found["exact"]["loss"]) < 1e-4
    # Gradients. bf16: each product's inputs rounded to 8 bits (3.9e-3), some twenty products
    # deep in the decoder, with softmax's and LayerNorm's backward cancelling: on a CPU's bf16
    # autocast the decoder's gradients came 5 % from float64 in the median tensor, 17 % in
    # the worst, 9 % over all; CAD's adapter, 4 %. float32 (TF32 off): its rounding, ~1e-6
    # in the decoder, ~1e-3 through BatchNorm in the adapter (see the module's notes).
    largest = max(g.norm().item() for g in found["exact"].values() if g is not None)
    for name, exact_grad in found["exact"].items():
        if exact_grad is None:
            assert found["bf16"][name] is None and found["fp32"][name] is None, name
            continue
        floor = largest if name.endswith(VANISHING) else FLOOR * largest
        assert norm_distance(found["bf16"][name], exact_grad, floor) < 3e-1, name
        assert norm_distance(found["fp32"][name], exact_grad, floor) < 1e-2, name
    names = [n for n, g in found["exact"].items() if g is not None and n != "loss"]
    every = {k: torch.cat([found[k][n].double().flatten() for n in names]) for k in found}
    assert norm_distance(every["bf16"], every["exact"]) < 2e-1
    assert norm_distance(every["fp32"], every["exact"]) < 5e-3


# -- 7. cached embeddings -----------------------------------------------------------------------


def test_a_step_from_cached_embeddings_equals_a_step_with_the_encoder():
    """CAD built without its encoder, given the frozen encoder's embeddings, trains as CAD with
    the encoder does: two steps (fast runtime), the losses and every trained tensor."""
    torch.manual_seed(10)
    full = build_model("cad", "vit_b", adapter_size=ADAPTER_SIZE, runtime=FAST).to(DEVICE)
    cached = build_model(
        "cad", "vit_b", adapter_size=ADAPTER_SIZE, with_encoder=False, runtime=FAST
    ).to(DEVICE)
    missing, unexpected = cached.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith("sam.image_encoder.") for k in unexpected)
    assert cached.sam.image_encoder is None
    initial = {k: v.clone() for k, v in full.trainable_state_dict().items()}
    runs = {}
    for name, model in (("full", full), ("cached", cached)):
        model.train()
        step = training_step(model, adamw(model.trainable_parameters(), 2e-4, 0.01), "fp32")
        losses = []
        for i in range(2):
            images, masks = images_and_masks(2, 256, seed=60 + i)
            embeddings = full.frozen_embeddings(images) if name == "cached" else None
            losses.append(step(images, masks, embeddings))
        runs[name] = torch.stack(losses), model.trainable_state_dict()
    # The same kernels on the same values, but for the order of float atomics in backward
    # (cuDNN's weight gradients, the upsampling's backward): ~1e-7 of a gradient, which moves
    # the second loss by as little, and the weights as disagreement() says.
    assert torch.allclose(runs["cached"][0], runs["full"][0], rtol=1e-5, atol=0)
    per_tensor, total = disagreement(runs["cached"][1], runs["full"][1], initial)
    worst = max(per_tensor, key=per_tensor.get)
    assert per_tensor[worst] < 1e-2, (worst, per_tensor[worst])
    assert total < 1e-3, total


# -- 8. encoder blocks recomputed in backward ---------------------------------------------------


@pytest.mark.gpu_memory(10)
@pytest.mark.parametrize("backbone", ["vit_b", "sam2.1_hiera_b+"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"], indirect=True)
def test_recomputed_encoder_blocks_equal_kept_blocks(monkeypatch, precision, backbone):
    """LoRA's step with every encoder block recomputed in backward (``lean``, and ``auto``
    with 8-48 GiB free; SAM-Adapter's blocks go the same way), fused attention as those
    runtimes run it: the logits and every trainable gradient. Its factors moved off their
    start, so that the gradients reach through the whole encoder."""
    torch.manual_seed(13)
    plain = build_model("lora", backbone).to(DEVICE).train()
    with torch.no_grad():
        for parameter in plain.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    recomputed = twin(plain, Runtime(fused_attention=True, checkpoint_encoder=True))
    exact = float64_twin(plain)
    recomputed_in_backward(encoder_blocks(exact.sam.image_encoder))  # not counted below
    recomputations = []

    def counted(*args, **kwargs):
        recomputations.append(args[0])
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(cadsam.fast.runner, "checkpoint", counted)
    # one image: in float64, the plain attention keeps GiBs per global block for backward
    images, masks = images_and_masks(1, 256, seed=14)
    found = {}
    # the plain path last, alone on the GPU: it keeps the most for backward (an H100 process
    # held to 12 GiB ran out by 0.8 GiB with the other two models beside it)
    for name, model in (("exact", exact), ("recomputed", recomputed), ("plain", plain)):
        if name == "plain":
            exact.cpu()
            recomputed.cpu()
            torch.cuda.empty_cache()
        with autocast("fp32" if name == "exact" else precision):
            logits = model(images)
        segmentation_loss(logits.double(), masks.double()).backward()
        found[name] = {"logits": logits.detach()} | grads(model)
        del logits
    blocks = encoder_blocks(plain.sam.image_encoder)
    assert len(recomputations) == len(blocks)  # each block, once in forward
    assert_no_farther(found["recomputed"], found["plain"], found["exact"], precision, GRAD_SLACK)
