"""CAD's adapter run leaner and faster: the same function as ``ConvAdapter.forward``.

Per block, one of four ways, chosen by the runtime and the block's size:

* band by band (:mod:`.tiling`) when its activation over the batch exceeds
  ``adapter_tile_mib``: autograd keeps only its input and BatchNorm's statistics; the first
  block's passes as Triton kernels (:mod:`.triton_block`) with ``triton_kernels``;
* whole, recomputed in backward, with ``checkpoint_adapter``;
* whole through ``torch.compile`` with ``compile_blocks``, which fuses BatchNorm, LeakyReLU, the
  residual and the poolings around the convolution;
* whole and eager, pooling with :func:`.tiling.pool_cells`, which keeps nothing of its input.

Activations run in channels_last with ``channels_last``. ``nn.SyncBatchNorm``'s statistics
span processes, so under torchrun the blocks run whole.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..methods.cad import NEGATIVE_SLOPE, ConvAdapter, ResidualDilatedBlock
from .compiler import compile_as_eager
from .runtime import Runtime, check_device, triton_available
from .tiling import activation_dtype, band_rows, pool_cells, tiled_residual_block


def run_adapter(
    adapter: ConvAdapter, images: torch.Tensor, runtime: Runtime, compiled: dict[Any, Any]
) -> torch.Tensor:
    """``adapter(images)`` under ``runtime``; ``compiled`` keeps the compiled blocks."""
    x = adapter.adapter_input(images)
    if runtime.channels_last:  # cuDNN's fast convolution layout; the same function
        x = x.contiguous(memory_format=torch.channels_last)
    size = adapter.embedding_size
    if adapter.layout == "paper":
        x = adapter.conv_up(x)
        for block in adapter.blocks:
            x, _ = _whole(block, x, runtime, compiled, size, pool_input=False)
        return torch.tanh(pool_to(x, size)).contiguous()
    pooled, reusable = [], False  # every block's output pooled to the embedding size
    for index, block in enumerate(adapter.blocks):
        rows = _band_rows(block, x, runtime.adapter_tile_mib)
        if rows:
            if index:
                pooled.append(pool_to(x, size))
            on_cuda = runtime.compile_tiles == "auto" and x.is_cuda
            conv_up = adapter.conv_up if index == 0 else None
            kernels = conv_up is not None and _use_kernels(runtime, x)
            x = tiled_residual_block(
                x, block, conv_up, rows, on_cuda or runtime.compile_tiles is True, reusable, kernels
            )
        elif index:  # the block pools the previous block's output as it reads it
            x, pooled_input = _whole(block, x, runtime, compiled, size, pool_input=True)
            pooled.append(pooled_input)
        else:
            x, _ = _whole(block, adapter.conv_up(x), runtime, compiled, size, pool_input=False)
        # a banded block's output is ours alone when its pooling keeps nothing of it: the
        # next banded block may then overwrite it with its gradient
        reusable = bool(rows) and _pools_by_cells(x, size)
    pooled.append(pool_to(x, size))
    return torch.tanh(sum(pooled[1:], pooled[0])).contiguous()


def _band_rows(block: nn.Module, x: torch.Tensor, tile_mib: float) -> int:
    """Rows per band if ``block`` should run band by band on ``x``, else 0: when its activation
    over the batch (in the dtype it is computed in: bfloat16 under autocast) exceeds
    ``tile_mib`` and its BatchNorm is not synchronised; a band then holds at most ``tile_mib``."""
    if tile_mib <= 0 or isinstance(block.bn, nn.SyncBatchNorm):
        return 0
    budget = int(tile_mib * 2**20)
    channels = block.conv.out_channels
    value_bytes = activation_dtype(x).itemsize
    if x[:, :1].numel() * channels * value_bytes <= budget:
        return 0
    return band_rows(channels, x.shape[-1], budget, value_bytes)


def _use_kernels(runtime: Runtime, x: torch.Tensor) -> bool:
    if runtime.triton_kernels == "auto":
        return x.is_cuda and triton_available()
    if runtime.triton_kernels:  # (the commands check this where it is given, before any work)
        check_device(runtime.replace(cuda_graph=False), x.device)
    return bool(runtime.triton_kernels)


def _whole(
    block: nn.Module,
    x: torch.Tensor,
    runtime: Runtime,
    compiled: dict[Any, Any],
    size: int,
    pool_input: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block whole, and with ``pool_input`` its input pooled to the embedding size."""
    compiles = runtime.compile_blocks
    # (never with checkpointing: torch 2.11's compiler on CUDA gives a block's recomputation
    # other weight strides than its backward expects, and fails there)
    if compiles == "auto":
        compiles = x.is_cuda and torch.is_grad_enabled() and not runtime.checkpoint_adapter
    if compiles:
        key = (block, size if pool_input else 0)
        if key not in compiled:
            # (one function for every block: its shapes are told apart, not made symbolic)
            compiled[key] = compile_as_eager(
                functools.partial(_block_and_pool, *key), dynamic=False
            )
        return compiled[key](x)
    pooled = pool_to(x, size) if pool_input else None
    if not (runtime.checkpoint_adapter and torch.is_grad_enabled()):
        return block_forward(block, x), pooled
    recomputed = checkpoint(
        block_forward,
        block,
        x,
        use_reentrant=False,
        preserve_rng_state=False,  # nothing random inside; and a CUDA graph can capture it
        context_fn=lambda: (contextlib.nullcontext(), _buffers_restored(block)),
    )
    return recomputed, pooled


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)``, its pooling keeping only ``x``'s shape for backward instead of the
    full-resolution sum (256 MiB per image in the first block)."""
    if isinstance(block, ResidualDilatedBlock):
        y = F.leaky_relu(block.bn(block.conv(x)), NEGATIVE_SLOPE)
        return pool_cells(y + x, 2)
    return pool_cells(block.bn(F.leaky_relu(block.conv(x), NEGATIVE_SLOPE)), 2)


def _block_and_pool(
    block: nn.Module, size: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``compile_blocks`` compiles: the block, and with ``size`` its input pooled to
    size x size, in ops whose backward the compiler fuses."""
    if not size:
        return block(x), None
    if _pools_by_cells(x, size):
        return block(x), F.avg_pool2d(x, x.shape[-1] // size)
    return block(x), F.adaptive_avg_pool2d(x, size)


def _pools_by_cells(x: torch.Tensor, size: int) -> bool:
    return x.shape[-2] == x.shape[-1] and x.shape[-1] % size == 0


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """``cad.pool_to``: by cell means where the size divides (autograd then keeps nothing of
    ``x``), else by ``adaptive_avg_pool2d``."""
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
