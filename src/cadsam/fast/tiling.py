"""CAD's full-resolution block at its memory floor: recomputed band by band, never stored.

The official block is ``pool2x2(leaky_relu(bn(conv(a))) + a)``, a 3 x 3 convolution of
dilation 2 at the adapter's full resolution; in the first block ``a = conv_up(x)`` lifts the
6-channel input to 256 channels. Autograd would keep several B x 256 x H x W tensors for it
(1 GiB each at batch 4, 512 x 512, float32). :func:`tiled_residual_block` keeps only its input
and BatchNorm's batch statistics, and recomputes the rest in bands of rows with the 2-row halo
the dilated convolution reads (4 rows where the input gradient is needed):

* forward, pass 1: the convolution band by band -> BatchNorm's batch mean and variance
  (combined in float64), running statistics updated exactly as ``nn.BatchNorm2d`` does;
* forward, pass 2: normalise, LeakyReLU, add the input, pool -> the output band;
* backward, pass 1: the two per-channel sums BatchNorm's gradient needs (they are the
  gradients of its weight and bias); pass 2: the gradient of the convolution's output, then
  the input and weight gradients, accumulated over bands.

In the first block ``conv(conv_up(x))`` is computed as one convolution of ``[x, 1]`` (6 + 1
channels, zero-padded to 8) by the product of the two kernels, so its recomputations read 8
channels instead of 256 (32 times fewer multiply-adds); weight gradients follow through the
product.

The convolutions run in the autocast dtype when autocast is on, everything else in float32
(float64 for float64 inputs), so the result equals the plain block's to rounding. The
elementwise arithmetic between convolutions is a handful of small functions; ``compiled=True``
runs them through ``torch.compile``, which fuses each into one kernel (eager, they would make
a dozen passes over every band, and cost more than the recomputed convolutions). With
``kernels=True`` the first block's passes are instead Triton kernels (:mod:`.triton_block`)
that never write the 256-channel activation at all. ``nn.SyncBatchNorm``'s statistics span
processes; callers keep the plain block for it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_input, conv2d_weight

from .compiler import compile_as_eager

NEGATIVE_SLOPE = 0.1  # the block's LeakyReLU
HALO = 2  # rows the dilated 3 x 3 convolution reads on each side of an output row


def pool_cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """``AvgPool2d(cell)``, the same values and gradients, but autograd keeps only ``x``'s
    shape and layout instead of ``x`` (256 MiB per image in the first block), and passes
    back a gradient in ``x``'s layout (channels_last stays channels_last)."""
    return _CellMean.apply(x, cell)


def pool2x2(x: torch.Tensor) -> torch.Tensor:
    return pool_cells(x, 2)


def _cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """B x C x H x W -> a view B x C x H/cell x cell x W/cell x cell, a cropped remainder
    left out."""
    h, w = (x.shape[-2] // cell) * cell, (x.shape[-1] // cell) * cell
    return x[..., :h, :w].unflatten(3, (w // cell, cell)).unflatten(2, (h // cell, cell))


class _CellMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cell: int) -> torch.Tensor:
        ctx.cell, ctx.shape = cell, x.shape
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous()
        ctx.channels_last &= x.is_contiguous(memory_format=torch.channels_last)
        # (a mean over a view of the cells is the same, and 2x slower on channels_last)
        return F.avg_pool2d(x, cell)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # each cell's gradient spread evenly over its pixels by a broadcast copy into a view of
        # the cells: 2.4x faster than upsampling and padding (benchmarks/experiments/HISTORY.md)
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        if ctx.cell == 1:
            return grad.contiguous(memory_format=layout), None
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
        if ctx.shape[-2] % ctx.cell or ctx.shape[-1] % ctx.cell:
            out.zero_()  # a cropped remainder gets no gradient
        _cells(out, ctx.cell).copy_((grad / ctx.cell**2)[:, :, :, None, :, None])
        return out, None


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` produces here: autocast's, where it is on."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def band_rows(channels: int, width: int, budget_bytes: int, value_bytes: int = 4) -> int:
    """Rows per band (of one image) so that its activation, ``value_bytes`` a value, fits in
    ``budget_bytes``; even, so that no 2 x 2 pooling cell straddles two bands."""
    rows = budget_bytes // (channels * width * value_bytes)
    return max(2, rows - rows % 2)


class _Norm(NamedTuple):
    """BatchNorm's per-channel terms, shaped C x 1 x 1 in the working dtype; ``center`` is the
    mean minus the convolution's bias (the bands convolve without it)."""

    center: torch.Tensor
    invstd: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor


def tiled_residual_block(
    x: torch.Tensor,
    block: nn.Module,
    conv_up: nn.Conv2d | None,
    rows: int,
    compiled: bool = False,
    reuse_input: bool = False,
    kernels: bool = False,
) -> torch.Tensor:
    """``block(conv_up(x))`` (or ``block(x)`` without ``conv_up``) for CAD's official block
    (``conv``, ``bn``), computed image by image in bands of at most ``rows`` rows: the same values
    and gradients, and the block's BatchNorm running statistics updated once, as the module
    would.

    ``reuse_input``: backward writes ``x``'s gradient into ``x``'s own storage, band by band
    behind the rows it still reads, so the two never coexist (256 MiB saved for the second
    block at batch 4). Only for an ``x`` that nothing else keeps for backward and nobody
    reads afterwards, such as the output of the previous banded block. Without effect with
    ``conv_up`` (the input is the 6-channel image) or bands under 4 rows (a band would
    overwrite rows the next one reads).

    ``kernels``: with ``conv_up``, the passes run as the Triton kernels of
    :mod:`.triton_block` (whole images, ``rows`` unused), which never write the activation;
    for even heights and widths and an input that needs no gradient, as CAD's first block's
    (the image). Otherwise the bands run every pass: BatchNorm's backward cancels terms that
    agree only when forward and backward compute the same convolution, and TF32 rounds
    differently in Triton's products and cuDNN's.
    """
    assert rows >= 2 and rows % 2 == 0, "bands start on even rows"
    assert not isinstance(block.bn, nn.SyncBatchNorm), "SyncBatchNorm takes the plain path"
    up_weight, up_bias = (conv_up.weight, conv_up.bias) if conv_up is not None else (None, None)
    conv, bn = block.conv, block.bn
    reuse_input = reuse_input and conv_up is None and rows >= 2 * HALO
    kernels = kernels and not x.requires_grad
    return _TiledResidualBlock.apply(
        x,
        up_weight,
        up_bias,
        conv.weight,
        conv.bias,
        bn.weight,
        bn.bias,
        bn,
        (rows, compiled, reuse_input, kernels),
    )


class _TiledResidualBlock(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        up_weight: torch.Tensor | None,
        up_bias: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        bn: nn.BatchNorm2d,
        banding: tuple[int, bool, bool, bool],
    ) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        batch_statistics = bn.training or bn.running_mean is None
        with torch.autocast(device_type, enabled=False):
            block = _Bands(x, up_weight, up_bias, weight, dtype, *banding)
            # the convolutions run without their bias: BatchNorm subtracts it again, so the
            # bands work with ``center`` = mean - bias instead
            if batch_statistics:
                center, var = block.batch_statistics()
                _update_running_statistics(bn, center + bias.double(), var, block.count)
            else:
                center, var = bn.running_mean.double() - bias.double(), bn.running_var.double()
            invstd = (var + bn.eps).rsqrt()
            norm = _Norm(*(block.per_channel(v) for v in (center, invstd, gamma, beta)))
            out = block.forward(norm)
        ctx.save_for_backward(
            x, up_weight, up_bias, weight, bias, gamma, beta, norm.center, norm.invstd
        )
        ctx.settings = (dtype, banding, batch_statistics)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, up_weight, up_bias, weight, bias, gamma, beta, center, invstd = ctx.saved_tensors
        dtype, banding, batch_statistics = ctx.settings
        with torch.autocast(x.device.type, enabled=False):
            block = _Bands(x, up_weight, up_bias, weight, dtype, *banding)
            norm = _Norm(center, invstd, block.per_channel(gamma), block.per_channel(beta))
            grads = block.backward(grad_out, norm, batch_statistics, ctx.needs_input_grad)
        inputs = (x, up_weight, up_bias, weight, bias, gamma, beta)
        grads = [
            g.to(t.dtype) if g is not None else None for g, t in zip(grads, inputs, strict=True)
        ]
        return (*grads, None, None)


class _Bands:
    """The block's arithmetic over bands of rows, shared by the forward and backward passes."""

    def __init__(
        self,
        x: torch.Tensor,
        up_weight: torch.Tensor | None,
        up_bias: torch.Tensor | None,
        weight: torch.Tensor,
        dtype: torch.dtype,
        rows: int,
        compiled: bool,
        reuse_input: bool,
        kernels: bool,
    ) -> None:
        self.x, self.dtype, self.rows, self.reuse_input = x, dtype, rows, reuse_input
        self.work = torch.promote_types(dtype, torch.float32)  # all but the convolutions
        self.batch, _, self.height, self.width = x.shape
        self.channels = weight.shape[0]
        self.count = self.batch * self.height * self.width  # values per channel
        self.f = _band_functions(compiled)
        self.fused = up_weight is not None
        self.kernels = False
        if not self.fused:
            self.source, self.weight = x, weight.to(dtype)
            return
        # conv_up is the 1 x 1 convolution of [x, 1] by [up_weight | up_bias], zero wherever
        # x is zero-padded, so conv(conv_up(x)) is one 3 x 3 convolution of [x, 1]: a few
        # input channels instead of 256, for every recomputation and the weight gradient.
        # Zero channels pad [x, 1] to a multiple of 8, which tensor cores want (2.4x in bf16).
        self.inputs = x.shape[1]
        width = -(-(self.inputs + 1) // 8) * 8
        self.up = torch.zeros((self.channels, width), dtype=self.work, device=x.device)
        self.up[:, : self.inputs] = up_weight.flatten(1)
        self.up[:, self.inputs] = up_bias
        self.block_weight = weight.to(self.work)
        self.weight = torch.einsum("oikl,ij->ojkl", self.block_weight, self.up).to(dtype)
        self.source = torch.empty(  # in the convolution's dtype, which is all it feeds
            (self.batch, width, self.height, self.width),
            dtype=dtype,
            device=x.device,
            memory_format=_layout(x),
        )
        self.source[:, self.inputs + 1 :] = 0
        self.source[:, : self.inputs] = x
        self.source[:, self.inputs] = 1
        even = self.height % 2 == 0 and self.width % 2 == 0  # no pixel outside a pooling cell
        low = dtype in (torch.float32, torch.bfloat16, torch.float16)
        self.kernels = kernels and width == 8 and even and low
        if self.kernels:
            from . import triton_block  # Triton is only needed where asked for

            self.triton, self.matrix = triton_block, triton_block.kernel_matrix(self.weight)

    def flat(self, norm: _Norm) -> Any:
        """BatchNorm's terms as the Triton kernels take them."""
        return self.triton.Norm(*(v.flatten().float().contiguous() for v in norm))

    def per_channel(self, values: torch.Tensor) -> torch.Tensor:
        """A per-channel vector in the working dtype, shaped to broadcast over B x C x H x W."""
        return values.to(self.work)[:, None, None]

    def bands(self) -> Iterator[tuple[slice, int, int]]:
        """(image, first row, end row) of each band: one image at a time (a band of a
        channels_last tensor is then contiguous), split evenly into bands of at most
        ``rows`` rows (512 rows at 192: 172, 172, 168, not 192, 192, 128)."""
        count = -(-self.height // self.rows)
        rows = -(-self.height // count)
        rows += rows % 2  # still <= self.rows, which is even
        for i in range(self.batch):
            for start in range(0, self.height, rows):
                yield slice(i, i + 1), start, min(start + rows, self.height)

    def conv_input(self, image: slice, lo: int, hi: int) -> torch.Tensor:
        """The convolution's input on rows [lo, hi), zero outside the image (the padding):
        the block's input ``a``, or ``[x, 1]`` where ``conv_up`` is fused."""
        part = self.source[image, :, max(lo, 0) : min(hi, self.height)].to(self.dtype)
        top, bottom = max(-lo, 0), max(hi - self.height, 0)
        return F.pad(part, (0, 0, top, bottom)) if top or bottom else part

    def residual(self, part: torch.Tensor) -> torch.Tensor:
        """The block's input ``a`` from the convolution's input on the same rows."""
        if not self.fused:
            return part
        return F.linear(part.permute(0, 2, 3, 1), self.up.to(self.dtype)).permute(0, 3, 1, 2)

    def conv(self, a: torch.Tensor) -> torch.Tensor:
        """Its input on rows [lo - HALO, hi + HALO) -> the convolution (no bias) on [lo, hi)."""
        return F.conv2d(a, self.weight, padding=(0, HALO), dilation=HALO)

    def batch_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance per channel of the bias-free convolution over the whole
        batch, in float64."""
        if self.kernels:
            return self.triton.moments(self.source, self.matrix)
        mean = torch.zeros(self.channels, dtype=torch.float64, device=self.x.device)
        m2 = torch.zeros_like(mean)
        seen = 0
        for image, lo, hi in self.bands():
            z = self.conv(self.conv_input(image, lo - HALO, hi + HALO))
            band_mean, band_var = self.f.moments(z)
            n = z.numel() // self.channels
            delta = band_mean.double() - mean
            total = seen + n
            mean += delta * (n / total)  # Chan et al.'s pairwise combination
            m2 += band_var.double() * n + delta.square() * (seen * n / total)
            seen = total
        return mean, m2 / seen

    def forward(self, norm: _Norm) -> torch.Tensor:
        out = torch.empty(
            (self.batch, self.channels, self.height // 2, self.width // 2),
            dtype=self.dtype,
            device=self.x.device,
            memory_format=_layout(self.x),
        )
        if self.kernels:
            return self.triton.output(self.source, self.matrix, self.up, self.flat(norm), out)
        for image, lo, hi in self.bands():
            part = self.conv_input(image, lo - HALO, hi + HALO)
            z = self.conv(part)
            a = self.residual(part[:, :, HALO:-HALO])
            out[image, :, lo // 2 : hi // 2] = self.f.output(z, a, norm)
        return out

    def backward(
        self,
        grad_out: torch.Tensor,
        norm: _Norm,
        batch_statistics: bool,
        needs: tuple[bool, ...],
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients for (x, up_weight, up_bias, weight, bias, gamma, beta)."""
        sum_g, sum_g_zhat = self.grad_sums(grad_out, norm)
        # with fixed statistics the batch's mean and variance carry no gradient
        scale = 1 / self.count if batch_statistics else 0.0
        mean_g, mean_g_zhat = self.per_channel(sum_g * scale), self.per_channel(sum_g_zhat * scale)
        # the conv bias's gradient, sum(grad_z): zero when BatchNorm subtracts the batch mean
        if batch_statistics:
            grad_bias = torch.zeros(self.channels, dtype=self.work, device=self.x.device)
        else:
            grad_bias = (norm.gamma * norm.invstd).flatten() * sum_g.to(self.work)
        if self.kernels:
            assert not needs[0], "the kernels run only for an input that needs no gradient"
            flat = [v.flatten().float().contiguous() for v in (mean_g, mean_g_zhat)]
            grad_x = None
            grad_weight, grad_up = self.triton.grads(
                self.source, self.matrix, self.flat(norm), grad_out, *flat
            )
        else:
            grad_x, grad_weight, grad_up = self.input_and_weight_grads(
                grad_out, norm, mean_g, mean_g_zhat, needs[0]
            )
        if not self.fused:
            return grad_x, None, None, grad_weight, grad_bias, sum_g_zhat, sum_g
        # the fused kernel is sum_i weight[:, i] up[i, :]: the chain rule through that product
        grad_up += torch.einsum("oikl,ojkl->ij", self.block_weight, grad_weight)
        grad_weight = torch.einsum("ojkl,ij->oikl", grad_weight, self.up)
        grad_up_weight = grad_up[:, : self.inputs, None, None]
        grad_up_bias = grad_up[:, self.inputs]
        return grad_x, grad_up_weight, grad_up_bias, grad_weight, grad_bias, sum_g_zhat, sum_g

    def grad_sums(self, grad_out: torch.Tensor, norm: _Norm) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward, pass 1: the sums over the batch that BatchNorm's gradient needs (its own
        gradients), in float64."""
        if self.kernels:
            return self.triton.grad_sums(self.source, self.matrix, self.flat(norm), grad_out)
        sum_g = torch.zeros(self.channels, dtype=torch.float64, device=self.x.device)
        sum_g_zhat = torch.zeros_like(sum_g)
        for image, lo, hi in self.bands():
            z = self.conv(self.conv_input(image, lo - HALO, hi + HALO))
            band_g, band_g_zhat = self.f.grad_sums(z, grad_out[image, :, lo // 2 : hi // 2], norm)
            sum_g += band_g
            sum_g_zhat += band_g_zhat
        return sum_g, sum_g_zhat

    def input_and_weight_grads(
        self,
        grad_out: torch.Tensor,
        norm: _Norm,
        mean_g: torch.Tensor,
        mean_g_zhat: torch.Tensor,
        needs_input: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Backward, pass 2: the gradients of x (where needed), of the convolution's weight
        (the fused kernel's, where fused) and of ``[U | b]`` (where fused, without its share
        through the fused kernel)."""
        work = dict(dtype=self.work, device=self.x.device)
        grad_weight = torch.zeros(self.weight.shape, **work)
        grad_up = torch.zeros(self.up.shape, **work) if self.fused else None
        grad_x = None
        if needs_input:
            grad_x = self.x if self.reuse_input else torch.empty_like(self.x)
        held = None  # (image, rows, gradient) the next band still reads as input: written after
        # conv rows [lo - HALO, hi + HALO) feed the input gradient of rows [lo, hi)
        for image, lo, hi in self.bands():
            top, bottom = max(lo - HALO, 0), min(hi + HALO, self.height)
            inner = slice(lo - top, hi - top)
            part = self.conv_input(image, top - HALO, bottom + HALO)
            grad_z = self.f.grad_z(
                self.conv(part),
                grad_out[image, :, top // 2 : bottom // 2],
                norm,
                mean_g,
                mean_g_zhat,
            )
            grad_weight += conv2d_weight(
                part[:, :, inner.start : inner.stop + 2 * HALO],
                self.weight.shape,
                grad_z[:, :, inner],
                padding=(0, HALO),
                dilation=HALO,
            )
            # the residual passes the block's gradient to ``a`` unchanged (spread over each
            # pooling cell); where fused, ``a`` = [U | b] [x, 1], so [U | b] gets its share
            grad_band = grad_out[image, :, lo // 2 : hi // 2]
            if self.fused:
                own_rows = part[:, :, inner.start + HALO : inner.stop + HALO].to(self.work)
                cells = _cells(own_rows, 2).mean((3, 5))
                grad_up += torch.einsum("bchw,bjhw->cj", grad_band.to(self.work), cells)
            shape = part.shape
            del part  # band tensors go once used: at most two of them are alive at a time
            if not needs_input:
                continue
            if self.fused:
                grad_band = torch.einsum("bchw,cj->bjhw", grad_band.to(self.work), self.up)
            grad_in = conv2d_input(shape, self.weight, grad_z, padding=(0, HALO), dilation=HALO)
            del grad_z
            grad_in = self.f.plus_unpooled(
                grad_in[:, :, inner.start + HALO : inner.stop + HALO], grad_band
            )
            if self.fused:  # [x, 1, 0...] -> x
                grad_x[image, :, lo:hi] = grad_in[:, : self.inputs]
                continue
            keep = 2 * HALO if self.reuse_input and hi < self.height else 0
            grad_x[image, :, lo : hi - keep] = grad_in[:, :, : hi - lo - keep]
            if held is not None:  # this band has read those rows: now they can go
                grad_x[held[0], :, held[1]] = held[2]
            held = None
            if keep:
                held = (image, slice(hi - keep, hi), grad_in[:, :, hi - lo - keep :].clone())
        return grad_x, grad_weight, grad_up


# -- the elementwise arithmetic of one band -------------------------------------------------
# z: the convolution on the band's rows (cast to the working dtype, that of the per-channel
# statistics, which arrive shaped C x 1 x 1); grad_out: the pooled gradient of those rows.


def _moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance per channel of one band."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    return mean, var


def _output(z: torch.Tensor, a: torch.Tensor, norm: _Norm) -> torch.Tensor:
    """The block's output rows: pool(LeakyReLU(BatchNorm(z)) + a), in the convolution dtype."""
    center, invstd, gamma, beta = norm
    bn = (z.to(center.dtype) - center) * invstd * gamma + beta
    pooled = _cells(F.leaky_relu(bn, NEGATIVE_SLOPE) + a.to(center.dtype), 2).mean((3, 5))
    return pooled.to(z.dtype)


def _grad_bn(
    z: torch.Tensor, grad_out: torch.Tensor, norm: _Norm
) -> tuple[torch.Tensor, torch.Tensor]:
    """zhat, and the gradient at BatchNorm's output (through the LeakyReLU)."""
    center, invstd, gamma, beta = norm
    zhat = (z.to(center.dtype) - center) * invstd
    grad_sum = _unpool(grad_out.to(center.dtype), z.shape[-2], z.shape[-1])
    return zhat, torch.where(zhat * gamma + beta > 0, grad_sum, grad_sum * NEGATIVE_SLOPE)


def _grad_sums(
    z: torch.Tensor, grad_out: torch.Tensor, norm: _Norm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: sum of the gradient at BatchNorm's output, and of it times zhat."""
    zhat, grad_bn = _grad_bn(z, grad_out, norm)
    return grad_bn.sum((0, 2, 3)), (grad_bn * zhat).sum((0, 2, 3))


def _grad_z(
    z: torch.Tensor,
    grad_out: torch.Tensor,
    norm: _Norm,
    mean_g: torch.Tensor,
    mean_g_zhat: torch.Tensor,
) -> torch.Tensor:
    """The gradient at the convolution's output, in its dtype: BatchNorm's backward, given the
    batch means of the gradient at its output and of that times zhat."""
    zhat, grad_bn = _grad_bn(z, grad_out, norm)
    return ((grad_bn - mean_g - zhat * mean_g_zhat) * (norm.gamma * norm.invstd)).to(z.dtype)


def _plus_unpooled(grad_a: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    work = torch.promote_types(grad_a.dtype, torch.float32)
    return grad_a.to(work) + _unpool(grad_out.to(work), grad_a.shape[-2], grad_a.shape[-1])


def _unpool(grad_out: torch.Tensor, height: int, width: int, cell: int = 2) -> torch.Tensor:
    """What ``pool_cells`` passes back to its height x width input, inside the band functions:
    each cell's gradient over its cell ** 2 pixels, spread evenly, zero on a cropped remainder.
    (A nearest-neighbour upsampling, which the compiler fuses into its consumer; expand +
    reshape would become a copy of the band. Eager, ``pool_cells``' own backward copies.)"""
    if grad_out.numel() == 0:  # a band of one odd last row: no whole cell
        return grad_out.new_zeros(*grad_out.shape[:2], height, width)
    g = F.interpolate(grad_out / cell**2, scale_factor=cell, mode="nearest")
    return F.pad(g, (0, width - g.shape[-1], 0, height - g.shape[-2]))


@functools.cache
def _band_functions(compiled: bool) -> types.SimpleNamespace:
    functions = {
        "moments": _moments,
        "output": _output,
        "grad_sums": _grad_sums,
        "grad_z": _grad_z,
        "plus_unpooled": _plus_unpooled,
    }
    if compiled:  # one fused kernel each
        # for fixed shapes: a band's few heights compile once each, and kernels compiled for
        # any height (dynamic=True) cost 40 % more, padding and unpooling in separate passes
        functions = {k: compile_as_eager(f, dynamic=False) for k, f in functions.items()}
    return types.SimpleNamespace(**functions)


@torch.no_grad()
def _update_running_statistics(
    bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    """What ``nn.BatchNorm2d`` does to its buffers in a training step (unbiased variance)."""
    if not (bn.training and bn.track_running_stats):
        return
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
