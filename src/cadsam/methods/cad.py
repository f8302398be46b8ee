"""CAD: the parallel convolutional adapter, as the authors' code builds it.

It reads the image (RGB 0..255 at adapter resolution) beside SAM's frozen encoder and
returns a tanh map the size of the image embedding; the model adds ``0.1 *`` that map to the
embedding. Two block layouts share the parameter count:

* ``official`` (default, what produced the paper's tables): 3x3 conv with dilation 2 ->
  BatchNorm -> LeakyReLU(0.1) -> + block input -> AvgPool 2; every block's output is pooled
  to the embedding size and the three are summed before tanh.
* ``paper``: the paper's text: 3x3 conv -> LeakyReLU -> BatchNorm -> AvgPool 2, no residual,
  no dilation, only the last block pooled to the embedding size.

Memory: with ``tile_mib > 0`` an official block whose activation exceeds that many MiB
(the first at 512 x 512, ``conv_up`` included, and the second at batch 4) runs band by band
(:mod:`.tiling`), its elementwise arithmetic compiled into fused kernels with
``compile_tiles`` ("auto": on CUDA), and the first block's passes as hand-written Triton
kernels that never write its activation with ``triton_kernels`` ("auto": on CUDA where Triton
imports); the others run whole: recomputed in backward with ``checkpoint_blocks``, else through
``torch.compile`` with ``compile_blocks`` ("auto": while training on CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CadsamError
from ..frequency import high_pass
from .tiling import activation_dtype, band_rows, pool2x2, pool_cells, tiled_residual_block

CAD_LAYOUTS = ("official", "paper")


class ConvAdapter(nn.Module):
    def __init__(
        self,
        embedding_size: int,
        embed_dim: int = 256,
        num_blocks: int = 3,
        layout: str = "official",
        high_pass_area: float = 0.25,
        checkpoint_blocks: bool = False,
        channels_last: bool = True,
        tile_mib: float = 0,
        compile_tiles: bool | str = "auto",
        triton_kernels: bool | str = "auto",
        compile_blocks: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.tile_mib = tile_mib
        self.compile_tiles = compile_tiles
        self.triton_kernels = triton_kernels
        self.compile_blocks = compile_blocks
        if layout not in CAD_LAYOUTS:
            raise ValueError(f"unknown CAD layout {layout!r}: choose from {CAD_LAYOUTS}")
        if compile_blocks is True and checkpoint_blocks:
            raise ValueError("compile_blocks=True does not combine with checkpoint_blocks")
        self.embedding_size = embedding_size
        self.layout = layout
        self.checkpoint_blocks = checkpoint_blocks
        self.high_pass_area = high_pass_area
        self.conv_up = nn.Conv2d(6, embed_dim, kernel_size=1)
        block = ResidualDilatedBlock if layout == "official" else PaperBlock
        self.blocks = nn.ModuleList(block(embed_dim) for _ in range(num_blocks))

    @torch.no_grad()
    def adapter_input(self, images: torch.Tensor) -> torch.Tensor:
        """RGB 0..255 -> [RGB, |high-pass|], each channel divided by its max (+1e-5)."""
        x = torch.cat((images.float(), high_pass(images, self.high_pass_area)), dim=1)
        return x / (x.amax(dim=(-2, -1), keepdim=True) + 1e-5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S RGB in 0..255 -> B x C x E x E tanh map (before the 0.1 scale)."""
        return self.forward_from_input(self.adapter_input(images))

    def forward_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter after :meth:`adapter_input` (B x 6 x S x S)."""
        if self.channels_last:  # cuDNN's fast convolution layout; the same function
            x = x.contiguous(memory_format=torch.channels_last)
        if self.layout == "paper":
            x = self.conv_up(x)
            for block in self.blocks:
                x, _ = self._run(block, x)
            return torch.tanh(pool_to(x, self.embedding_size)).contiguous()
        pooled, reusable = [], False  # every block's output pooled to the embedding size
        for index, block in enumerate(self.blocks):
            rows = self._band_rows(block, x)
            if rows:
                if index:
                    pooled.append(pool_to(x, self.embedding_size))
                compiled = x.is_cuda if self.compile_tiles == "auto" else self.compile_tiles
                conv_up = self.conv_up if index == 0 else None
                kernels = conv_up is not None and self._triton_kernels(x)
                x = tiled_residual_block(x, block, conv_up, rows, bool(compiled), reusable, kernels)
            elif index:  # the block pools the previous block's output as it reads it
                x, pooled_input = self._run(block, x, pool_input=True)
                pooled.append(pooled_input)
            else:
                x, _ = self._run(block, self.conv_up(x))
            # a banded block's output is ours alone when its pooling keeps nothing of it: the
            # next banded block may then overwrite it with its gradient
            reusable = bool(rows) and _pools_by_cells(x, self.embedding_size)
        pooled.append(pool_to(x, self.embedding_size))
        return torch.tanh(sum(pooled[1:], pooled[0])).contiguous()

    def _band_rows(self, block: nn.Module, x: torch.Tensor) -> int:
        """Rows per band if ``block`` should run band by band on ``x``, else 0: when its
        activation over the batch (in the dtype it is computed in: bfloat16 under autocast)
        exceeds ``tile_mib`` and its BatchNorm is not synchronised; a band then holds at most
        ``tile_mib``."""
        if self.tile_mib <= 0 or isinstance(block.bn, nn.SyncBatchNorm):
            return 0
        budget = int(self.tile_mib * 2**20)
        channels = block.conv.out_channels
        value_bytes = activation_dtype(x).itemsize
        if x[:, :1].numel() * channels * value_bytes <= budget:
            return 0
        return band_rows(channels, x.shape[-1], budget, value_bytes)

    def _triton_kernels(self, x: torch.Tensor) -> bool:
        available = _triton_available()
        if self.triton_kernels == "auto":
            return x.is_cuda and available
        if self.triton_kernels and not available:
            raise CadsamError("triton_kernels=true needs Triton: pip install triton")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if self.triton_kernels and not (x.is_cuda or interpreted):
            raise CadsamError(
                "triton_kernels=true needs a CUDA device (on a CPU, Triton runs kernels only "
                "under TRITON_INTERPRET=1, its slow interpreter): use auto or false"
            )
        return bool(self.triton_kernels)

    def _run(
        self, block: nn.Module, x: torch.Tensor, pool_input: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block whole, and with ``pool_input`` its input pooled to the embedding size.
        With ``checkpoint_blocks`` the block is recomputed in backward (keeping only its
        input), its BatchNorm statistics updated once, as in the plain path. With
        ``compile_blocks`` both go through ``torch.compile``, which fuses BatchNorm, LeakyReLU,
        the residual and the poolings around the convolution, and whose one backward then
        gives the input's whole gradient (no second full-size gradient to add to it)."""
        compiles = self.compile_blocks
        # (never with checkpointing: torch 2.11's compiler on CUDA gives a block's
        # recomputation other weight strides than its backward expects, and fails there)
        if compiles == "auto":
            compiles = x.is_cuda and torch.is_grad_enabled() and not self.checkpoint_blocks
        if compiles:
            compiled = self.__dict__.setdefault("_compiled_blocks", {})  # out of the module tree
            size = self.embedding_size if pool_input else 0
            if (block, size) not in compiled:
                # (one function for every block: its shapes are told apart, not made symbolic)
                run = functools.partial(_block_and_pool, block, size)
                compiled[block, size] = torch.compile(run, dynamic=False)
            return compiled[block, size](x)
        pooled = pool_to(x, self.embedding_size) if pool_input else None
        if not (self.checkpoint_blocks and torch.is_grad_enabled()):
            return block(x), pooled
        recomputed = checkpoint(
            block,
            x,
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random inside; and a CUDA graph can capture it
            context_fn=lambda: (contextlib.nullcontext(), _buffers_restored(block)),
        )
        return recomputed, pooled


def _block_and_pool(
    block: nn.Module, size: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``compile_blocks`` compiles: the block, and with ``size`` its input pooled to
    size x size as ``pool_to`` does, in ops whose backward the compiler fuses."""
    if not size:
        return block(x), None
    if _pools_by_cells(x, size):
        return block(x), F.avg_pool2d(x, x.shape[-1] // size)
    return block(x), F.adaptive_avg_pool2d(x, size)


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pools_by_cells(x: torch.Tensor, size: int) -> bool:
    return x.shape[-2] == x.shape[-1] and x.shape[-1] % size == 0


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool a square map to size x size: by cell means where the size divides
    (autograd then keeps nothing of ``x``), else by ``adaptive_avg_pool2d``."""
    if _pools_by_cells(x, size):
        return pool_cells(x, x.shape[-1] // size)
    return F.adaptive_avg_pool2d(x, size)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """Undo what a recomputed forward does to buffers (BatchNorm's running statistics)."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class ResidualDilatedBlock(nn.Module):
    """conv 3x3 (dilation 2) -> BN -> LeakyReLU(0.1) -> + input -> AvgPool 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.bn(self.conv(x)), 0.1)
        return pool2x2(y + x)


class PaperBlock(nn.Module):
    """conv 3x3 -> LeakyReLU(0.1) -> BN -> AvgPool 2, as the paper's text describes it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool2x2(self.bn(F.leaky_relu(self.conv(x), 0.1)))
