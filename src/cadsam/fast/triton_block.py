# ruff: noqa: N803  (compile-time arguments in upper case, as Triton writes them)
"""CAD's first block as four Triton kernels that never write its 256-channel activation.

With ``conv_up`` fused (:mod:`.tiling`), the first block's convolution reads 8 channels
(``[x, 1]``, zero-padded) and writes 256 at the adapter's full resolution. The banded torch
passes write that activation (128 MiB per image in bfloat16) and read it back, four times a
training step. Here every pass computes the convolution for a tile of 2 x 2 pooling cells, one
cell position at a time, as one matrix product (each pixel's 9 taps x 8 channels, zero-padded
to 128, by the kernel as a 128 x C matrix) and does what follows in registers:

* ``moments``: per tile, the mean and the squared deviations of each channel (combined over
  the tiles in float64, as the bands do);
* ``output``: BatchNorm, LeakyReLU, the residual ``[U | b] [x, 1]``, the 2 x 2 mean;
* ``grad_sums``: the two per-channel sums BatchNorm's gradient needs, per tile;
* ``grads``: the gradient at the convolution's output times the patches, the fused kernel's
  weight gradient; and the pooled gradient times the pooled input, ``[U | b]``'s share.

The products run in the convolution's dtype with float32 accumulation (TF32 for float32 where
cuDNN's convolutions would use it); everything else in float32. Only for even heights and
widths, where every pixel belongs to a pooling cell; callers use the bands otherwise. On a CPU
the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported), which is how the tests check them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

NEGATIVE_SLOPE = tl.constexpr(0.1)  # the block's LeakyReLU (a constant the kernels can read)
PATCH = 128  # 9 taps x 8 channels = 72, padded to a power of two for the matrix product
SOURCE_CHANNELS = 8  # [x, 1], zero-padded
CENTER = 16  # the centre pixel's 8 channels, padded to the smallest matrix-product width
# launch settings (timed against the alternatives: benchmarks/experiments/HISTORY.md)
CELLS_PER_TILE = 32  # pooling cells along a row per tile (fewer where the row is shorter)
BLOCK_C = 128  # channels per program, at most
NUM_WARPS = 4
# the same in ``grads``, whose program holds a PATCH x channels sum over many tiles
GRAD_CELLS_PER_TILE = 32
GRAD_BLOCK_C = 64
GRAD_NUM_WARPS = 4
GRAD_PROGRAMS = 128  # tiles are shared among this many programs per channel block


class Norm(NamedTuple):
    """BatchNorm's per-channel terms as flat float32 vectors (``center`` = mean - conv bias)."""

    center: torch.Tensor
    invstd: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor


class Tiles(NamedTuple):
    """How the kernels split a B x 8 x H x W source: rows of ``cells`` pooling cells."""

    batch: int
    height: int
    width: int
    cells: int  # pooling cells per tile, along a row
    per_row: int  # tiles per row of cells
    count: int  # tiles in all

    @classmethod
    def of(cls, source: torch.Tensor, most_cells: int = 0) -> Tiles:
        """Tiles of at most ``most_cells`` cells (default CELLS_PER_TILE)."""
        batch, channels, height, width = source.shape
        assert channels == SOURCE_CHANNELS and height % 2 == 0 and width % 2 == 0
        most_cells = most_cells or CELLS_PER_TILE
        cells = max(16, min(most_cells, triton.next_power_of_2(width // 2)))
        per_row = triton.cdiv(width // 2, cells)
        return cls(batch, height, width, cells, per_row, batch * height // 2 * per_row)

    def sizes(self, device: torch.device) -> torch.Tensor:
        """Pixels per tile (the last of a row may hold fewer cells), as float64; made on the
        device, as a CUDA graph's capture requires."""
        cells = torch.full((self.per_row,), self.cells, dtype=torch.float64, device=device)
        # (fill_, not ``cells[-1] = n``: that copies a CPU scalar, which capture forbids)
        cells[-1:].fill_(self.width // 2 - self.cells * (self.per_row - 1))
        return (4 * cells).repeat(self.count // self.per_row)


def kernel_matrix(weight: torch.Tensor) -> torch.Tensor:
    """C x 8 x 3 x 3 -> the PATCH x C matrix the kernels multiply patches by: row
    ``tap * 8 + channel``, tap = 3 * kernel row + kernel column, zero past the 72 rows."""
    channels = weight.shape[0]
    matrix = weight.new_zeros(PATCH, channels)
    matrix[: 9 * SOURCE_CHANNELS] = weight.permute(2, 3, 1, 0).reshape(-1, channels)
    return matrix


def weight_from_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`kernel_matrix`, for the weight gradient."""
    channels = matrix.shape[1]
    taps = matrix[: 9 * SOURCE_CHANNELS].reshape(3, 3, SOURCE_CHANNELS, channels)
    return taps.permute(3, 2, 0, 1)


# -- the shared parts of every kernel ----------------------------------------------------------


@triton.jit
def _tile(t, height, width, per_row, CELLS: tl.constexpr):
    """Tile ``t`` -> its image, row of cells, the cells' columns and which of them exist."""
    image = (t // (per_row * (height // 2))).to(tl.int64)
    cell_row = (t // per_row) % (height // 2)
    cell_col = (t % per_row) * CELLS + tl.arange(0, CELLS)
    return image, cell_row, cell_col, cell_col < width // 2


@triton.jit
def _patches(src, s_b, s_c, s_h, s_w, height, width, image, row, cols, valid, DTYPE: tl.constexpr):
    """The dilated 3 x 3 convolution's inputs at pixels (row, cols): CELLS x PATCH, zero in
    the padding, past the 72 taps x channels and for missing cells."""
    k = tl.arange(0, 128)
    tap = k // 8
    r = row + 2 * (tap // 3) - 2
    c = cols[:, None] + (2 * (tap % 3) - 2)[None, :]
    inside = (tap < 9) & (r >= 0) & (r < height)
    mask = valid[:, None] & inside[None, :] & (c >= 0) & (c < width)
    offsets = image * s_b + (k % 8) * s_c + r.to(tl.int64) * s_h
    return tl.load(src + offsets[None, :] + c * s_w, mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _pixel(src, s_b, s_c, s_h, s_w, image, row, cols, valid):
    """The source's 8 channels at pixels (row, cols), float32, CELLS x 16 (zero past 8)."""
    j = tl.arange(0, 16)
    mask = valid[:, None] & (j < 8)[None, :]
    offsets = image * s_b + row.to(tl.int64) * s_h + j * s_c
    return tl.load(src + offsets[None, :] + cols[:, None] * s_w, mask=mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def _per_channel(ptr, channels, cmask):
    return tl.load(ptr + channels, mask=cmask, other=0.0)


@triton.jit
def _channel_block(weight, n_channels, BLOCK_C: tl.constexpr):
    """This program's channels, which of them exist, and the kernel matrix's columns for them
    (PATCH x BLOCK_C)."""
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = channels < n_channels
    k = tl.arange(0, 128)
    offsets = k[:, None] * n_channels + channels[None, :]
    return channels, cmask, tl.load(weight + offsets, mask=cmask[None, :], other=0.0)


@triton.jit
def _norm(center, invstd, gamma, beta, channels, cmask):
    """BatchNorm's terms for this program's channels."""
    return (
        _per_channel(center, channels, cmask),
        _per_channel(invstd, channels, cmask),
        _per_channel(gamma, channels, cmask),
        _per_channel(beta, channels, cmask),
    )


@triton.jit
def _cells_at(s_b, s_c, s_h, s_w, image, cell_row, cols, valid, channels, cmask):
    """Offsets and mask of a tile's cells x this program's channels in a B x C x H/2 x W/2
    tensor of strides (s_b, s_c, s_h, s_w)."""
    offsets = image * s_b + cell_row * s_h + cols[:, None] * s_w + channels[None, :] * s_c
    return offsets, valid[:, None] & cmask[None, :]


# -- the four passes ---------------------------------------------------------------------------


@triton.jit
def _moments_kernel(
    src, s_b, s_c, s_h, s_w, height, width, per_row,
    weight, n_channels, mean_out, m2_out,
    CELLS: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    channels, cmask, w = _channel_block(weight, n_channels, BLOCK_C)
    image, cell_row, cols, valid = _tile(t, height, width, per_row, CELLS)
    n = tl.sum(valid.to(tl.float32), axis=0)  # pixels per cell position
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for q in tl.static_range(4):  # the four pixels of each cell, combined as Chan et al.'s
        row, pixel_cols = 2 * cell_row + q // 2, 2 * cols + q % 2
        a = _patches(src, s_b, s_c, s_h, s_w, height, width, image, row, pixel_cols, valid, w.dtype)
        z = tl.dot(a, w, input_precision=PRECISION)
        q_mean = tl.sum(z, axis=0) / n  # missing cells' rows are zero
        deviation = tl.where(valid[:, None], z - q_mean[None, :], 0.0)
        delta = q_mean - mean
        mean += delta / (q + 1)
        m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * (n * q / (q + 1))
    tl.store(mean_out + t * n_channels + channels, mean, mask=cmask)
    tl.store(m2_out + t * n_channels + channels, m2, mask=cmask)


@triton.jit
def _output_kernel(
    src, s_b, s_c, s_h, s_w, height, width, per_row,
    weight, n_channels, up, center, invstd, gamma, beta,
    out, o_b, o_c, o_h, o_w,
    CELLS: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    channels, cmask, w = _channel_block(weight, n_channels, BLOCK_C)
    mean, inv, gam, bet = _norm(center, invstd, gamma, beta, channels, cmask)
    scale = inv * gam
    shift = bet - mean * scale
    image, cell_row, cols, valid = _tile(tl.program_id(0), height, width, per_row, CELLS)
    activation = tl.zeros((CELLS, BLOCK_C), tl.float32)
    summed_input = tl.zeros((CELLS, 16), tl.float32)
    for q in tl.static_range(4):
        row, pixel_cols = 2 * cell_row + q // 2, 2 * cols + q % 2
        a = _patches(src, s_b, s_c, s_h, s_w, height, width, image, row, pixel_cols, valid, w.dtype)
        y = tl.dot(a, w, input_precision=PRECISION) * scale[None, :] + shift[None, :]
        activation += tl.where(y > 0, y, y * NEGATIVE_SLOPE)
        summed_input += _pixel(src, s_b, s_c, s_h, s_w, image, row, pixel_cols, valid)
    # the residual [U | b] [x, 1], summed over the cell like the activation
    j = tl.arange(0, 16)
    up_mask = (j[:, None] < 8) & cmask[None, :]
    up_t = tl.load(up + channels[None, :] * 8 + j[:, None], mask=up_mask, other=0.0)
    residual = tl.dot(summed_input, up_t, input_precision="ieee")
    offsets, mask = _cells_at(o_b, o_c, o_h, o_w, image, cell_row, cols, valid, channels, cmask)
    value = (activation + residual) * 0.25
    tl.store(out + offsets, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _grad_bn(a, w, g, scale_z, center, gamma, beta, PRECISION: tl.constexpr):
    """zhat, and the gradient at BatchNorm's output through the LeakyReLU."""
    zhat = (tl.dot(a, w, input_precision=PRECISION) - center[None, :]) * scale_z[None, :]
    y = zhat * gamma[None, :] + beta[None, :]
    return zhat, tl.where(y > 0, g, g * NEGATIVE_SLOPE)


@triton.jit
def _grad_sums_kernel(
    src, s_b, s_c, s_h, s_w, height, width, per_row,
    weight, n_channels, center, invstd, gamma, beta,
    grad, g_b, g_c, g_h, g_w, sum_g_out, sum_g_zhat_out,
    CELLS: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    channels, cmask, w = _channel_block(weight, n_channels, BLOCK_C)
    mean, inv, gam, bet = _norm(center, invstd, gamma, beta, channels, cmask)
    image, cell_row, cols, valid = _tile(t, height, width, per_row, CELLS)
    offsets, mask = _cells_at(g_b, g_c, g_h, g_w, image, cell_row, cols, valid, channels, cmask)
    g = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32) * 0.25  # per pixel
    sum_g = tl.zeros((BLOCK_C,), tl.float32)
    sum_g_zhat = tl.zeros((BLOCK_C,), tl.float32)
    for q in tl.static_range(4):
        row, pixel_cols = 2 * cell_row + q // 2, 2 * cols + q % 2
        a = _patches(src, s_b, s_c, s_h, s_w, height, width, image, row, pixel_cols, valid, w.dtype)
        zhat, grad_bn = _grad_bn(a, w, g, inv, mean, gam, bet, PRECISION)
        sum_g += tl.sum(grad_bn, axis=0)
        sum_g_zhat += tl.sum(grad_bn * zhat, axis=0)
    tl.store(sum_g_out + t * n_channels + channels, sum_g, mask=cmask)
    tl.store(sum_g_zhat_out + t * n_channels + channels, sum_g_zhat, mask=cmask)


@triton.jit
def _grads_kernel(
    src, s_b, s_c, s_h, s_w, height, width, per_row, tiles, programs,
    weight, n_channels, center, invstd, gamma, beta, mean_g, mean_g_zhat,
    grad, g_b, g_c, g_h, g_w, grad_weight_out, grad_up_out,
    CELLS: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)  # of ``programs``
    channels, cmask, w = _channel_block(weight, n_channels, BLOCK_C)
    mean, inv, gam, bet = _norm(center, invstd, gamma, beta, channels, cmask)
    m_g = _per_channel(mean_g, channels, cmask)
    m_g_zhat = _per_channel(mean_g_zhat, channels, cmask)
    grad_weight = tl.zeros((128, BLOCK_C), tl.float32)
    grad_up = tl.zeros((16, BLOCK_C), tl.float32)
    t = program
    # a while, not range(): Triton 3.6's interpreter gives tl.program_id as a 1-element array,
    # which range() refuses under NumPy 2.4
    while t < tiles:
        image, cell_row, cols, valid = _tile(t, height, width, per_row, CELLS)
        offsets, mask = _cells_at(g_b, g_c, g_h, g_w, image, cell_row, cols, valid, channels, cmask)
        g_cell = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32)
        summed_input = tl.zeros((CELLS, 16), tl.float32)
        for q in tl.static_range(4):
            row, pixel_cols = 2 * cell_row + q // 2, 2 * cols + q % 2
            a = _patches(
                src, s_b, s_c, s_h, s_w, height, width, image, row, pixel_cols, valid, w.dtype
            )
            zhat, grad_bn = _grad_bn(a, w, g_cell * 0.25, inv, mean, gam, bet, PRECISION)
            grad_z = (grad_bn - m_g[None, :] - zhat * m_g_zhat[None, :]) * (gam * inv)[None, :]
            grad_z = tl.where(mask, grad_z, 0.0).to(w.dtype)
            grad_weight += tl.dot(tl.trans(a), grad_z, input_precision=PRECISION)
            summed_input += _pixel(src, s_b, s_c, s_h, s_w, image, row, pixel_cols, valid)
        # the residual's share: the cell's gradient times the cell's mean input
        grad_up += tl.dot(tl.trans(summed_input * 0.25), g_cell, input_precision="ieee")
        t += programs
    k, j = tl.arange(0, 128), tl.arange(0, 16)
    base = program * n_channels
    tl.store(
        grad_weight_out + (base * 128 + k[:, None] * n_channels) + channels[None, :],
        grad_weight,
        mask=cmask[None, :],
    )
    tl.store(
        grad_up_out + (base * 16 + j[:, None] * n_channels) + channels[None, :],
        grad_up,
        mask=cmask[None, :],
    )


# -- the passes as functions of tensors ---------------------------------------------------------


def _source_args(source: torch.Tensor, tiles: Tiles) -> tuple:
    return (source, *source.stride(), tiles.height, tiles.width, tiles.per_row)


def _launch(matrix: torch.Tensor, tiles: Tiles, most: int = 0, warps: int = 0) -> tuple[int, dict]:
    """Channels per program (at most ``most``, default BLOCK_C), and the compile-time settings
    every kernel takes (``warps``: default NUM_WARPS)."""
    most, warps = most or BLOCK_C, warps or NUM_WARPS  # (read at the call: benchmarks set them)
    block_c = max(16, min(most, triton.next_power_of_2(matrix.shape[1])))
    tf32 = matrix.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    precision = "tf32" if tf32 else "ieee"
    settings = dict(CELLS=tiles.cells, BLOCK_C=block_c, PRECISION=precision, num_warps=warps)
    return block_c, settings


def moments(source: torch.Tensor, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance per channel of ``source`` convolved by ``matrix`` (a
    :func:`kernel_matrix`), over the batch, in float64."""
    tiles, channels = Tiles.of(source), matrix.shape[1]
    block_c, settings = _launch(matrix, tiles)
    means = source.new_empty(tiles.count, channels, dtype=torch.float32)
    m2s = torch.empty_like(means)
    grid = (tiles.count, triton.cdiv(channels, block_c))
    _moments_kernel[grid](*_source_args(source, tiles), matrix, channels, means, m2s, **settings)
    sizes = tiles.sizes(source.device)[:, None]
    count = sizes.sum()
    mean = (means.double() * sizes).sum(0) / count
    m2 = m2s.double().sum(0) + ((means.double() - mean).square() * sizes).sum(0)
    return mean, m2 / count


def output(
    source: torch.Tensor, matrix: torch.Tensor, up: torch.Tensor, norm: Norm, out: torch.Tensor
) -> torch.Tensor:
    """Writes the block's output cells into ``out`` (B x C x H/2 x W/2); ``up`` is
    ``[U | b]`` zero-padded to C x 8."""
    tiles, channels = Tiles.of(source), matrix.shape[1]
    block_c, settings = _launch(matrix, tiles)
    grid = (tiles.count, triton.cdiv(channels, block_c))
    _output_kernel[grid](
        *_source_args(source, tiles),
        matrix, channels, up.float().contiguous(), *norm,
        out, *out.stride(),
        **settings,
    )  # fmt: skip
    return out


def grad_sums(
    source: torch.Tensor, matrix: torch.Tensor, norm: Norm, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, in float64: the sum of the gradient at BatchNorm's output, and of it times
    zhat (BatchNorm's bias and weight gradients)."""
    tiles, channels = Tiles.of(source), matrix.shape[1]
    block_c, settings = _launch(matrix, tiles)
    sums = source.new_empty(2, tiles.count, channels, dtype=torch.float32)
    grid = (tiles.count, triton.cdiv(channels, block_c))
    _grad_sums_kernel[grid](
        *_source_args(source, tiles),
        matrix, channels, *norm,
        grad_out, *grad_out.stride(), sums[0], sums[1],
        **settings,
    )  # fmt: skip
    sum_g, sum_g_zhat = sums.double().sum(1)
    return sum_g, sum_g_zhat


def grads(
    source: torch.Tensor,
    matrix: torch.Tensor,
    norm: Norm,
    grad_out: torch.Tensor,
    mean_g: torch.Tensor,
    mean_g_zhat: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's weight gradient (C x 8 x 3 x 3) and ``[U | b]``'s (C x 8), float32,
    given BatchNorm's two batch means of the gradient (flat float32 vectors)."""
    tiles, channels = Tiles.of(source, GRAD_CELLS_PER_TILE), matrix.shape[1]
    block_c, settings = _launch(matrix, tiles, GRAD_BLOCK_C, GRAD_NUM_WARPS)
    programs = min(tiles.count, GRAD_PROGRAMS)
    grad_weight = source.new_empty(programs, PATCH, channels, dtype=torch.float32)
    grad_up = source.new_empty(programs, CENTER, channels, dtype=torch.float32)
    grid = (programs, triton.cdiv(channels, block_c))
    settings["num_stages"] = 1  # two products' operands, staged twice, overflow shared memory
    _grads_kernel[grid](
        *_source_args(source, tiles), tiles.count, programs,
        matrix, channels, *norm, mean_g, mean_g_zhat,
        grad_out, *grad_out.stride(), grad_weight, grad_up,
        **settings,
    )  # fmt: skip
    grad_weight = weight_from_matrix(grad_weight.sum(0))
    return grad_weight, grad_up.sum(0)[:SOURCE_CHANNELS].T
