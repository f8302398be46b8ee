"""SAM's ViT image encoder: windowed and global attention with decomposed relative positions.

Parameter names and shapes follow Meta's checkpoints (``image_encoder.*``).

Attention comes in two formulations that compute the same function:

* ``plain``: scores, bias and softmax built explicitly, as in the paper's code. It keeps
  heads x N x N score *and* bias tensors alive, hundreds of MiB per image in the global
  layers (N = 4096).
* ``fused`` (default): the decomposed bias ``rel_h[q, row(k)] + rel_w[q, col(k)]`` is a dot
  product, so it is folded into the query/key vectors (queries gain their ``rel_h`` and
  ``rel_w`` rows, keys gain one-hot row/column indicators) and one call of PyTorch's
  ``scaled_dot_product_attention`` does the rest with no N x N tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock

# runs one encoder block on its tokens: ``block(tokens)``, or recomputed in backward
RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class ImageEncoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                fused_attention=fused_attention,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding (64 for Meta's configs)."""
        return self.img_size // self.patch_size

    def set_fused_attention(self, fused: bool) -> None:
        for block in self.blocks:
            block.attn.fused = fused

    def forward(self, x: torch.Tensor, run_block: RunBlock | None = None) -> torch.Tensor:
        """B x 3 x img_size x img_size normalised images -> B x 256 x grid x grid embeddings.
        ``run_block(block, tokens)``, where given, runs each block: how a method that trains
        inside the encoder (LoRA) has its runner keep or recompute their activations."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x) if run_block is None else run_block(block, x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B x H x W x C


class Block(nn.Module):
    """Pre-norm transformer block; attention runs in windows unless ``window_size`` is 0."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: tuple[int, int],
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, attn_size, fused=fused_attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1:3]
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head attention with SAM's decomposed relative position bias."""

    def __init__(
        self, dim: int, num_heads: int, input_size: tuple[int, int], fused: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        n = height * width
        qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x N x head_dim
        rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, height, width)
        if self.fused:
            out = _fused_rel_pos_attention(q, k, v, rel_h, rel_w, self.scale)
        else:
            out = _plain_rel_pos_attention(q, k, v, rel_h, rel_w, self.scale)
        out = out.transpose(1, 2).reshape(batch, height, width, -1)
        return self.proj(out)


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query bias terms: ``rel_h`` (.. x N x height) over key rows, ``rel_w`` over columns.

    They use the *unscaled* query, as SAM does.
    """
    table_h = relative_position_table(height, rel_pos_h)  # height x height x head_dim
    table_w = relative_position_table(width, rel_pos_w)
    r_q = q.unflatten(-2, (height, width))  # ... x height x width x head_dim
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, table_h).flatten(-3, -2)
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, table_w).flatten(-3, -2)
    return rel_h, rel_w


def relative_position_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the embedding of offset ``i - j`` for every query/key index pair: size x size x C.

    A table trained for another size is linearly resampled, as SAM does.
    """
    span = 2 * size - 1
    if rel_pos.shape[0] != span:
        rel_pos = F.interpolate(
            rel_pos.T.unsqueeze(0), size=span, mode="linear", align_corners=False
        )[0].T
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


def _plain_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The reference formulation: explicit scores plus the broadcast bias, then softmax."""
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.unflatten(-1, (height, width)) + rel_h[..., :, None] + rel_w[..., None, :]
    return attn.flatten(-2).softmax(dim=-1) @ v


def _fused_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same function with the bias folded into q/k, so SDPA never builds N x N tensors.

    ``[q*s, rel_h, rel_w] . [k, onehot(row), onehot(col)] = s q.k + rel_h[row] + rel_w[col]``.
    """
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    rows = torch.arange(height, device=q.device).repeat_interleave(width)
    cols = torch.arange(width, device=q.device).repeat(height)
    indicators = torch.cat((F.one_hot(rows, height), F.one_hot(cols, width)), dim=-1).to(
        k.dtype
    )  # N x (height + width)
    q_aug = torch.cat((q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)), dim=-1)
    k_aug = torch.cat((k, indicators.expand(*k.shape[:-1], -1)), dim=-1)
    pad = -q_aug.shape[-1] % 8  # fused kernels want head dims that are multiples of 8
    if pad:
        q_aug = F.pad(q_aug, (0, pad))
        k_aug = F.pad(k_aug, (0, pad))
    return F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """B x H x W x C -> (B * windows) x window x window x C, zero-padding H and W first."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = -height % window, -width % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    x = x.view(batch, hp // window, window, wp // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    hp, wp = padded
    batch = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(batch, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    return x[:, : size[0], : size[1], :].contiguous()
