"""CAD's banded block against the plain module: values, every gradient, BatchNorm's buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err

from cadsam import build_model
from cadsam.fast.adapter import _band_rows, run_adapter
from cadsam.fast.runtime import Runtime
from cadsam.fast.tiling import _Bands, band_rows, pool2x2, pool_cells, tiled_residual_block
from cadsam.methods.cad import ConvAdapter, ResidualDilatedBlock

CHANNELS = 8


def _block_pair(
    training: bool, momentum: float | None = 0.1, seed: int = 0, channels: int = CHANNELS
):
    torch.manual_seed(seed)
    block, conv_up = ResidualDilatedBlock(channels), torch.nn.Conv2d(6, channels, 1)
    block.bn.momentum = momentum
    with torch.no_grad():  # BatchNorm away from its identity start, so every term matters
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
    block.train(training)
    return (block, conv_up), copy.deepcopy((block, conv_up))


# (batch, height, width, rows per band, conv_up fused, BatchNorm in training mode)
CASES = [
    (3, 13, 11, 4, True, True),  # odd sizes, bands that do not divide the height
    (1, 10, 9, 2, False, True),  # batch 1, the smallest band
    (3, 17, 8, 6, False, True),
    (1, 9, 12, 4, True, True),
    (2, 12, 12, 6, True, False),  # running statistics: one forward pass, no BatchNorm sums
    (3, 11, 7, 4, False, False),
]


@pytest.mark.parametrize(("batch", "height", "width", "rows", "fused", "training"), CASES)
def test_banded_block_equals_the_plain_block(batch, height, width, rows, fused, training):
    (block, conv_up), (plain_block, plain_up) = _block_pair(training)
    x = torch.randn(batch, 6 if fused else CHANNELS, height, width) * 3 + 1
    x_plain, x_banded = x.clone().requires_grad_(), x.clone().requires_grad_()
    for scale in (1.0, 0.5):  # two steps: running statistics advance twice, gradients add up
        expected = plain_block(plain_up(x_plain * scale) if fused else x_plain * scale)
        actual = tiled_residual_block(x_banded * scale, block, conv_up if fused else None, rows)
        assert actual.shape == expected.shape == (batch, CHANNELS, height // 2, width // 2)
        assert rel_err(actual, expected) < 1e-5
        # only some output pixels receive gradient, as with a masked loss
        upstream = torch.randn_like(expected) * (torch.rand_like(expected) > 0.3)
        expected.backward(upstream)
        actual.backward(upstream)
    assert rel_err(x_banded.grad, x_plain.grad) < 1e-5
    assert_trained_alike((block, conv_up if fused else None), (plain_block, plain_up), training)
    assert block.bn.num_batches_tracked.item() == (2 if training else 0)


def run_from_input(
    adapter: ConvAdapter, x: torch.Tensor, runtime: Runtime, compiled: dict | None = None
) -> torch.Tensor:
    """``run_adapter`` from the adapter's input ``x`` (B x 6 x S x S) instead of from images,
    as ``forward_from_input`` is to ``forward``: ``adapter_input`` always gives float32, and
    this runs the fast paths in float64 too."""
    adapter.adapter_input = lambda images: x  # shadows the method on this instance
    try:
        return run_adapter(adapter, x, runtime, {} if compiled is None else compiled)
    finally:
        del adapter.adapter_input


def assert_trained_alike(pair, plain_pair, training: bool) -> None:
    """The gradients of a (block, conv_up or None) equal the plain pair's, and so do the
    block's buffers (BatchNorm's running statistics)."""
    (block, conv_up), (plain_block, plain_up) = pair, plain_pair
    pairs = [*zip(block.named_parameters(), plain_block.parameters(), strict=True)]
    if conv_up is not None:
        pairs += [*zip(conv_up.named_parameters(), plain_up.parameters(), strict=True)]
    for (name, tested), plain in pairs:
        if training and name == "conv.bias":  # BatchNorm removes the mean: zero in exact math
            assert tested.grad.abs().max() < 1e-5 * block.conv.weight.grad.abs().max()
            continue
        assert rel_err(tested.grad, plain.grad) < 1e-5, name
    for (name, tested), plain in zip(block.named_buffers(), plain_block.buffers(), strict=True):
        assert torch.allclose(tested.float(), plain.float(), rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize(
    ("batch", "height", "rows", "training"),
    [(3, 17, 6, True), (2, 16, 4, True), (1, 13, 8, False), (2, 10, 2, True)],
)
def test_a_block_that_reuses_its_input_for_its_gradient(batch, height, rows, training):
    """Bands of several rows per image, so later bands read rows whose gradient is pending;
    2-row bands are too thin to reuse the input and take the separate gradient."""
    (block, _), (plain_block, _) = _block_pair(training)
    x = torch.randn(batch, CHANNELS, height, 9) * 3 + 1
    x_plain, x_banded = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = plain_block(x_plain * 2)
    scratch = x_banded * 2  # an input that nothing else reads or keeps
    actual = tiled_residual_block(scratch, block, None, rows, reuse_input=True)
    storage = []
    scratch.register_hook(lambda grad: storage.append(grad.data_ptr()))
    assert rel_err(actual, expected) < 1e-5
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    actual.backward(upstream)
    assert (storage[0] == scratch.data_ptr()) == (rows >= 4)
    assert rel_err(x_banded.grad, x_plain.grad) < 1e-5
    assert_trained_alike((block, None), (plain_block, None), training)


@pytest.mark.parametrize(
    ("batch", "height", "rows", "expected"),
    [
        (1, 512, 192, [(0, 0, 172), (0, 172, 344), (0, 344, 512)]),  # not 192, 192, 128
        (1, 13, 4, [(0, 0, 4), (0, 4, 8), (0, 8, 12), (0, 12, 13)]),
        (2, 10, 10, [(0, 0, 10), (1, 0, 10)]),
        (2, 9, 16, [(0, 0, 9), (1, 0, 9)]),  # never two images in one band
    ],
)
def test_bands_split_each_image_evenly_within_the_budget(batch, height, rows, expected):
    x = torch.empty(batch, CHANNELS, height, 3)
    bands = _Bands(
        x, None, None, torch.empty(CHANNELS, CHANNELS, 3, 3), x.dtype, rows, False, False, False
    )
    images = [(image.start, lo, hi) for image, lo, hi in bands.bands()]
    assert images == expected
    sizes = [(image.stop - image.start) * (hi - lo) for image, lo, hi in bands.bands()]
    assert max(sizes) <= rows


def test_cumulative_running_statistics_match_momentum_none():
    (block, _), (plain_block, _) = _block_pair(training=True, momentum=None)
    for seed in range(3):
        x = torch.randn(2, CHANNELS, 10, 10, generator=torch.Generator().manual_seed(seed))
        plain_block(x)
        tiled_residual_block(x, block, None, rows=4)
    assert torch.allclose(block.bn.running_mean, plain_block.bn.running_mean, rtol=1e-6)
    assert torch.allclose(block.bn.running_var, plain_block.bn.running_var, rtol=1e-6)


def test_input_without_gradient_still_trains_conv_up():
    (block, conv_up), (plain_block, plain_up) = _block_pair(training=True)
    x = torch.rand(2, 6, 12, 10)  # the adapter's input: no gradient wanted
    plain_block(plain_up(x)).square().sum().backward()
    tiled_residual_block(x, block, conv_up, rows=4).square().sum().backward()
    assert rel_err(conv_up.weight.grad, plain_up.weight.grad) < 1e-5
    assert rel_err(conv_up.bias.grad, plain_up.bias.grad) < 1e-5


def test_bf16_autocast_is_as_close_to_float64_as_the_plain_block():
    """Under bf16 autocast both blocks round differently (the banded one convolves [x, 1] by
    the fused kernel): each is checked against the float64 block, the banded one to within
    twice the plain one's error."""
    (block, conv_up), (plain_block, plain_up) = _block_pair(training=True)
    exact_block, exact_up = copy.deepcopy((plain_block, plain_up))
    exact_block.double(), exact_up.double()
    x = torch.rand(2, 6, 16, 16, generator=torch.Generator().manual_seed(0)) * 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = plain_block(plain_up(x))
        banded = tiled_residual_block(x, block, conv_up, rows=4)
    exact = exact_block(exact_up(x.double()))
    assert banded.dtype == plain.dtype == torch.bfloat16
    upstream = torch.randn_like(exact)
    for out in (plain, banded):
        out.float().backward(upstream.float())
    exact.backward(upstream)
    triples = [(banded, plain, exact)] + [
        (b.grad, p.grad, e.grad)
        for b, p, e in (
            (block.conv.weight, plain_block.conv.weight, exact_block.conv.weight),
            (block.bn.weight, plain_block.bn.weight, exact_block.bn.weight),
            (conv_up.weight, plain_up.weight, exact_up.weight),
            (conv_up.bias, plain_up.bias, exact_up.bias),
        )
    ]
    for banded_value, plain_value, exact_value in triples:
        plain_error = rel_err(plain_value.double(), exact_value)
        assert plain_error < 5e-2
        assert rel_err(banded_value.double(), exact_value) < 2 * plain_error + 1e-3


def test_band_rows_fit_the_budget_and_stay_even():
    assert band_rows(256, 512, 64 * 2**20) == 128  # 256 x 512 x 4 B = 0.5 MiB a row
    assert band_rows(256, 512, 3 * 2**19) == 2  # 1.5 MiB: 3 rows, rounded down to even
    assert band_rows(256, 512, 1) == 2  # never below one pooling cell
    assert band_rows(256, 512, 64 * 2**20, value_bytes=2) == 256  # bfloat16


def test_the_budget_counts_the_dtype_the_activation_is_computed_in():
    adapter = build_model("cad", "vit_tiny", adapter_size=64).adapter
    x = torch.rand(2, 6, 64, 64)
    assert _band_rows(adapter.blocks[0], x, 1) == 16  # float32: 1 MiB is 16 rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _band_rows(adapter.blocks[0], x, 1) == 32
    assert _band_rows(adapter.blocks[0], x.double(), 1) == 8


def test_adapter_bands_only_what_exceeds_the_budget():
    torch.manual_seed(1)
    adapter = build_model("cad", "vit_tiny", adapter_size=64).adapter
    x = torch.rand(2, 6, 64, 64)  # block 1: 2 x 256 x 64 x 64 x 4 B = 8 MiB
    assert _band_rows(adapter.blocks[0], x, 1) == 16  # 1 MiB of one image
    assert _band_rows(adapter.blocks[2], torch.rand(2, 256, 16, 16), 1) == 0  # 0.5 MiB
    assert _band_rows(adapter.blocks[0], x, 0) == 0
    adapter.blocks[0].bn = torch.nn.SyncBatchNorm(256)  # statistics across processes: plain
    assert _band_rows(adapter.blocks[0], x, 1) == 0


def test_banded_adapter_equals_the_plain_adapter_in_float64():
    """The whole adapter, banded blocks (``run_adapter``) against the plain module, both in
    float64: in float32 the LeakyReLU's kinks and BatchNorm's sums amplify rounding (the plain
    float32 path itself drifts from float64 by up to 1e-2 in some gradients here), so this
    checks the algebra."""
    torch.manual_seed(2)
    plain = build_model("cad", "vit_tiny", adapter_size=64).adapter
    banded = copy.deepcopy(plain)
    banded.double(), plain.double()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 255
    x = banded.adapter_input(images).double()
    # two blocks banded, the second over its predecessor's output, in 12-row bands
    runtime = Runtime(adapter_tile_mib=12 * 32 * 256 * 8 / 2**20)
    assert _band_rows(banded.blocks[0], x, runtime.adapter_tile_mib) == 6
    second = torch.empty(2, 256, 32, 32).double()
    assert _band_rows(banded.blocks[1], second, runtime.adapter_tile_mib) == 12
    expected, actual = plain.forward_from_input(x), run_from_input(banded, x, runtime)
    assert rel_err(actual, expected) < 1e-10
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    actual.backward(upstream)
    scale = banded.conv_up.weight.grad.abs().max()
    for (name, a), b in zip(banded.named_parameters(), plain.parameters(), strict=True):
        if name.endswith("conv.bias"):  # zero in exact math, before BatchNorm
            assert a.grad.abs().max() < 1e-10 * scale
        else:
            assert rel_err(a.grad, b.grad) < 1e-10, name
    for a, b in zip(banded.buffers(), plain.buffers(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("shape", "cell"),
    [((2, 3, 8, 8), 2), ((1, 2, 9, 7), 2), ((1, 2, 9, 7), 3), ((2, 3, 8, 8), 4), ((1, 2, 5, 5), 1)],
)
def test_pool_cells_is_avg_pool2d_values_and_gradients(shape, cell):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    pool = pool2x2 if cell == 2 else lambda t: pool_cells(t, cell)
    a, b = pool(x), torch.nn.functional.avg_pool2d(y, cell)
    assert torch.allclose(a, b)
    upstream = torch.randn_like(a)
    a.backward(upstream)
    b.backward(upstream)
    assert torch.allclose(x.grad, y.grad)
    channels_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    pool(channels_last).backward(upstream)  # the gradient keeps the input's layout
    assert channels_last.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(channels_last.grad, y.grad)


def test_compiled_band_arithmetic_equals_eager():
    """What CUDA runs by default (the elementwise band functions through torch.compile),
    here on CPU: one compile, about half a minute."""
    (block, conv_up), (eager_block, eager_up) = _block_pair(training=True)
    x = torch.randn(3, 6, 13, 11) * 3 + 1
    outputs = []
    for b, up, compiled in ((block, conv_up, True), (eager_block, eager_up, False)):
        out = tiled_residual_block(x, b, up, rows=4, compiled=compiled)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        outputs.append(out)
    assert rel_err(outputs[0], outputs[1]) < 1e-5
    for (name, a), b in zip(
        [*block.named_parameters(), *conv_up.named_parameters()],
        [*eager_block.parameters(), *eager_up.parameters()],
        strict=True,
    ):
        assert rel_err(a.grad, b.grad) < 1e-6, name
