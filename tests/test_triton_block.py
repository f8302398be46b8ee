"""The first block's Triton kernels (under Triton's interpreter, on CPU) against the banded
torch passes, the plain module and float64. Each test that runs the kernels asks for the
``interpreted_triton`` fixture, so it runs in the process with ``TRITON_INTERPRET=1`` that
test_interpreted_triton starts (and is skipped in any other)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from test_tiling import _block_pair, assert_trained_alike

import cadsam.fast.runtime
from cadsam import build_model
from cadsam.errors import CadsamError
from cadsam.fast.runner import FastRunner
from cadsam.fast.runtime import Runtime, resolve_runtime
from cadsam.fast.tiling import tiled_residual_block


@pytest.fixture
def small_launches(monkeypatch, interpreted_triton):
    """Launch settings that give these small images several channel blocks (the last one
    partial) and several tiles per ``grads`` program."""
    monkeypatch.setattr(interpreted_triton, "BLOCK_C", 16)
    monkeypatch.setattr(interpreted_triton, "GRAD_BLOCK_C", 16)
    monkeypatch.setattr(interpreted_triton, "GRAD_PROGRAMS", 5)
    return interpreted_triton


# (batch, height, width, BatchNorm in training mode, input needs a gradient, channels_last)
CASES = [
    (2, 12, 40, True, False, True),  # 20 cells a row: a tile of 32 cells, 12 of them missing
    (3, 8, 6, True, False, True),  # 3 cells a row: a tile of 16, most of it missing
    (1, 10, 12, False, False, True),  # running statistics
    (2, 6, 8, True, True, True),  # x needs a gradient: the bands run every pass
    (2, 8, 10, True, False, False),  # NCHW
    (2, 9, 12, True, False, True),  # an odd height: the bands throughout
]


@pytest.mark.parametrize(
    ("batch", "height", "width", "training", "input_grad", "channels_last"), CASES
)
def test_kernels_equal_the_plain_block(
    monkeypatch, small_launches, batch, height, width, training, input_grad, channels_last
):
    channels = 24  # two channel blocks of 16, the second partial
    calls = []
    output = small_launches.output
    monkeypatch.setattr(small_launches, "output", lambda *a: calls.append(1) or output(*a))
    (block, conv_up), (plain_block, plain_up) = _block_pair(training, channels=channels)
    x = torch.randn(batch, 6, height, width) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_plain = x.clone().requires_grad_(input_grad)
    x_kernels = x.clone().requires_grad_(input_grad)
    for scale in (1.0, 0.5):  # two steps: running statistics advance twice, gradients add up
        expected = plain_block(plain_up(x_plain * scale))
        actual = tiled_residual_block(x_kernels * scale, block, conv_up, 4, kernels=True)
        assert actual.shape == expected.shape
        assert rel_err(actual, expected) < 1e-5
        upstream = torch.randn_like(expected) * (torch.rand_like(expected) > 0.3)
        expected.backward(upstream)
        actual.backward(upstream)
    if input_grad:
        assert rel_err(x_kernels.grad, x_plain.grad) < 1e-5
    assert len(calls) == (0 if input_grad or height % 2 else 2)  # the kernels, each step
    assert_trained_alike((block, conv_up), (plain_block, plain_up), training)


def test_moments_match_float64(interpreted_triton):
    """The per-tile means and squared deviations, combined over tiles, against the mean and
    variance of the convolution computed in float64."""
    triton_block = interpreted_triton
    torch.manual_seed(0)
    source = torch.rand(2, 8, 10, 36) + 3  # a mean far from zero, as with [x, 1]
    weight = torch.randn(20, 8, 3, 3)
    mean, var = triton_block.moments(source, triton_block.kernel_matrix(weight))
    z = F.conv2d(source.double(), weight.double(), padding=2, dilation=2)
    expected_var, expected_mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == torch.float64
    assert rel_err(mean, expected_mean) < 1e-6
    assert rel_err(var, expected_var) < 1e-5


def test_kernel_matrix_round_trips_and_tiles_count_every_pixel(interpreted_triton):
    triton_block = interpreted_triton
    weight = torch.randn(5, 8, 3, 3)
    matrix = triton_block.kernel_matrix(weight)
    assert matrix.shape == (triton_block.PATCH, 5)
    assert torch.equal(matrix[9 * 8 :], torch.zeros(triton_block.PATCH - 72, 5))
    assert torch.equal(triton_block.weight_from_matrix(matrix), weight)
    tiles = triton_block.Tiles.of(torch.empty(3, 8, 6, 70))  # 35 cells a row: tiles of 32, 3
    assert (tiles.cells, tiles.per_row, tiles.count) == (32, 2, 3 * 3 * 2)
    sizes = tiles.sizes(torch.device("cpu"))
    assert sizes[:2].tolist() == [128, 12] and sizes.sum().item() == 3 * 6 * 70


@pytest.mark.parametrize("choice", ["auto", True])
def test_the_adapter_runs_the_kernels_where_asked(monkeypatch, interpreted_triton, choice):
    """'auto' leaves CPU tensors to the bands; True runs the kernels, as close to float64 as
    the bands. (Float32 rounding is amplified by BatchNorm over 256 channels, so the two float32
    paths are compared through their distances to float64: the plain module in float64.)"""
    calls = []
    output = interpreted_triton.output
    monkeypatch.setattr(interpreted_triton, "output", lambda *a: calls.append(1) or output(*a))
    torch.manual_seed(0)
    kernels, bands = (
        build_model(
            "cad", "vit_tiny", adapter_size=64, runtime=Runtime(adapter_tile_mib=1).replace(**k)
        )
        for k in ({"triton_kernels": choice}, {})
    )
    assert isinstance(kernels.runner, FastRunner) and isinstance(bands.runner, FastRunner)
    assert kernels.runner.runtime.triton_kernels == choice
    bands.load_state_dict(kernels.state_dict())
    exact = build_model("cad", "vit_tiny", adapter_size=64)  # the plain path
    exact.load_state_dict(kernels.state_dict())
    exact.double()
    images = torch.rand(1, 3, 64, 64) * 255
    results = []
    for model in (kernels, bands, exact):
        if model is exact:
            x = model.adapter.adapter_input(images).double()
            out = model.adapter.forward_from_input(x)
        else:
            out = model.runner.adapter(model.adapter, images)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        grads = torch.cat([p.grad.flatten() for p in model.adapter.parameters()])
        results.append((out.double(), grads.double()))
    assert len(calls) == (1 if choice is True else 0)
    (out, grads), (bands_out, bands_grads), (exact_out, exact_grads) = results
    assert rel_err(out, exact_out) <= 2 * rel_err(bands_out, exact_out) + 1e-7
    assert rel_err(grads, exact_grads) <= 2 * rel_err(bands_grads, exact_grads) + 1e-7
    assert rel_err(grads, exact_grads) < 1e-3


@pytest.mark.parametrize("name", ["plain", "lean", "auto"])
def test_forced_kernels_without_a_gpu_or_the_interpreter_are_a_user_error(monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(CadsamError, match="triton_kernels=true needs a CUDA device"):
        resolve_runtime(name, {"triton_kernels": True}, "cpu")
    monkeypatch.setattr(cadsam.fast.runtime, "triton_available", lambda: False)
    with pytest.raises(CadsamError, match="triton_kernels=true needs Triton: pip install"):
        resolve_runtime(name, {"triton_kernels": True}, "cpu")
    # 'auto' needs neither: on a CPU it leaves the first block to the bands
    runtime, _ = resolve_runtime(name, {"triton_kernels": "auto"}, "cpu")
    assert runtime.triton_kernels == "auto"


def test_forced_kernels_under_the_interpreter_are_allowed_on_a_cpu(interpreted_triton):
    runtime, _ = resolve_runtime("plain", {"triton_kernels": True}, "cpu")
    assert runtime.triton_kernels is True
