"""SAM 2's Hiera trunk: a hierarchical ViT whose stages halve the resolution by pooling queries.

Parameter names and shapes follow Meta's checkpoints (``image_encoder.trunk.*``).

The trunk embeds the image with a 7 x 7 convolution of stride 4, adds a background position
embedding (resampled bicubically to the token grid) plus a window embedding tiled over it, then
runs its blocks stage by stage. The first block of each pooling stage projects the tokens to the
stage's wider channels and max-pools its queries (and its shortcut) 2 x 2; its attention still
runs in the previous stage's windows, which the pooling halves. Every other block attends within
its stage's windows, or globally if listed in ``global_att_blocks``. The trunk returns the last
block of every stage, highest resolution first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..sam.image_encoder import RunBlock, window_partition, window_unpartition
from .common import MLP


@dataclass(frozen=True)
class BlockPlan:
    """One block's shape: its channels in and out, heads, attention window (0: global) and
    whether it pools its queries (the first block of a pooling stage)."""

    dim: int
    dim_out: int
    num_heads: int
    window_size: int
    pool: bool


def plan_blocks(
    embed_dim: int,
    num_heads: int,
    stages: tuple[int, ...],
    global_att_blocks: tuple[int, ...],
    window_spec: tuple[int, ...],
    q_pool: int = 3,
    dim_mul: float = 2.0,
    head_mul: float = 2.0,
) -> list[BlockPlan]:
    """Every block's shape, as Meta's Hiera lays them out.

    A stage's first block keeps the previous stage's window (the window "lags by a block"), and
    the first blocks of stages 2 .. ``q_pool + 1`` pool their queries.
    """
    if len(stages) != len(window_spec):
        raise ValueError("stages and window_spec need one entry per stage")
    stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
    pool_blocks = {end + 1 for end in stage_ends[:-1][:q_pool]}
    plans, stage, dim = [], 0, embed_dim
    for i in range(sum(stages)):
        window = 0 if i in global_att_blocks else window_spec[stage]
        dim_out = dim
        if i - 1 in stage_ends:
            dim_out = int(dim * dim_mul)
            num_heads = int(num_heads * head_mul)
            stage += 1
        plans.append(BlockPlan(dim, dim_out, num_heads, window, i in pool_blocks))
        dim = dim_out
    return plans


class Hiera(nn.Module):
    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: tuple[int, ...] = (2, 3, 16, 3),
        global_att_blocks: tuple[int, ...] = (12, 16, 20),
        window_spec: tuple[int, ...] = (8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        q_pool: int = 3,
        q_stride: int = 2,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        first_window = window_spec[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, first_window, first_window))
        plans = plan_blocks(embed_dim, num_heads, stages, global_att_blocks, window_spec, q_pool)
        self.blocks = nn.ModuleList(
            MultiScaleBlock(plan, q_stride if plan.pool else None, mlp_ratio) for plan in plans
        )
        self.channel_list = [self.blocks[end].dim_out for end in reversed(self.stage_ends)]

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The background embedding resampled to the grid plus the tiled window one: 1 x H x W x C."""
        pos = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")
        window = self.pos_embed_window
        pos = pos + window.tile(1, 1, height // window.shape[-2], width // window.shape[-1])
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, run_block: RunBlock | None = None) -> list[torch.Tensor]:
        """B x 3 x H x W normalised images -> each stage's output (B x C x h x w), finest
        first; each block run by ``run_block`` where given (as SAM's encoder does)."""
        x = self.patch_embed(x)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x) if run_block is None else run_block(block, x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class PatchEmbed(nn.Module):
    """A 7 x 7 convolution of stride 4 (padding 3): B x 3 x H x W -> B x H/4 x W/4 x C."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def pool_tokens(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """Apply a 2-D pooling to B x H x W x C tokens."""
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MultiScaleBlock(nn.Module):
    """Pre-norm block; a pooling block also projects its shortcut and pools it like its queries."""

    def __init__(self, plan: BlockPlan, q_stride: int | None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim, self.dim_out = plan.dim, plan.dim_out
        self.window_size = plan.window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(plan.dim, eps=1e-6)
        self.pool = nn.MaxPool2d(q_stride, stride=q_stride) if q_stride else None
        self.attn = MultiScaleAttention(plan.dim, plan.dim_out, plan.num_heads, self.pool)
        self.norm2 = nn.LayerNorm(plan.dim_out, eps=1e-6)
        hidden = int(plan.dim_out * mlp_ratio)
        self.mlp = MLP(plan.dim_out, hidden, plan.dim_out, num_layers=2, activation=nn.GELU)
        if plan.dim != plan.dim_out:
            self.proj = nn.Linear(plan.dim, plan.dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.pool is not None:
                shortcut = pool_tokens(shortcut, self.pool)
        window = self.window_size
        if window > 0:
            x, _ = window_partition(x, window)
        x = self.attn(x)
        if window > 0:
            if self.q_stride:  # the pooled queries left windows of half the size
                window //= self.q_stride
            height, width = shortcut.shape[1:3]
            padded = (height + -height % window, width + -width % window)
            x = window_unpartition(x, window, padded, (height, width))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class MultiScaleAttention(nn.Module):
    """Multi-head attention from ``dim`` to ``dim_out`` channels whose queries may be pooled."""

    def __init__(
        self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x H x W x dim -> B x H' x W' x dim_out (H', W' halved when queries are pooled)."""
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # each B x N x heads x head_dim
        if self.q_pool is not None:
            q = pool_tokens(q.reshape(batch, height, width, -1), self.q_pool)
            height, width = q.shape[1:3]
            q = q.reshape(batch, height * width, self.num_heads, -1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))
