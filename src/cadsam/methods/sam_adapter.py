"""SAM-Adapter: prompts computed from the image and added to the encoder's tokens.

Unlike CAD these act *inside* the frozen encoder, so every block's activations stay in the
autograd graph (the runtime's ``checkpoint_encoder`` recomputes them per block in backward).

* :class:`OfficialSamAdapter`: Chen et al.'s prompt generator (scale factor 32).
* :class:`PaperSamAdapter`: the CAD authors' re-implementation, which the paper's tables
  compare against (tune dim 192, hidden 32, one shared up-projection).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..frequency import high_pass
from ..sam.image_encoder import ImageEncoderViT, RunBlock


def _plain_block(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return block(tokens)


def run_blocks(
    encoder: ImageEncoderViT,
    tokens: torch.Tensor,
    prompt: Callable[[int], torch.Tensor],
    num_prompts: int,
    run_block: RunBlock,
) -> torch.Tensor:
    """Add ``prompt(i)`` before block i, and ``prompt(depth)`` after the last block if
    ``num_prompts`` is depth + 1. Each prompt is made just before it is added, so only one
    B x H x W x E prompt is alive at a time. ``run_block(block, tokens)``: the runner's."""
    for i, block in enumerate(encoder.blocks):
        tokens = run_block(block, tokens + prompt(i))
    if num_prompts > len(encoder.blocks):
        tokens = tokens + prompt(len(encoder.blocks))
    return encoder.neck(tokens.permute(0, 3, 1, 2))


class OfficialSamAdapter(nn.Module):
    """Chen et al.: d = E/32; per-block ``lightweight_mlp_i`` then a shared Linear(d -> E)."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        patch_size: int = 16,
        scale_factor: int = 32,
        high_pass_area: float = 0.25,
    ) -> None:
        super().__init__()
        dim = embed_dim // scale_factor
        self.depth = depth
        self.high_pass_area = high_pass_area
        self.shared_mlp = nn.Linear(dim, embed_dim)
        self.embedding_generator = nn.Linear(embed_dim, dim)
        for i in range(depth):
            self.add_module(f"lightweight_mlp_{i}", nn.Sequential(nn.Linear(dim, dim), nn.GELU()))
        self.prompt_generator = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def encode(
        self, encoder: ImageEncoderViT, x: torch.Tensor, run_block: RunBlock = _plain_block
    ) -> torch.Tensor:
        """Normalised encoder input -> image embedding, with prompts before every block."""
        patches = encoder.patch_embed(x)  # B x H x W x E, before the position embedding
        handcrafted = self.prompt_generator(high_pass(x, self.high_pass_area)).permute(0, 2, 3, 1)
        task = handcrafted + self.embedding_generator(patches)

        def prompt(i: int) -> torch.Tensor:
            return self.shared_mlp(getattr(self, f"lightweight_mlp_{i}")(task))

        tokens = patches + encoder.pos_embed
        return run_blocks(encoder, tokens, prompt, self.depth, run_block)


class PaperSamAdapter(nn.Module):
    """CAD authors' version: depth + 1 adapters (after the embedding, then after each block)."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        patch_size: int = 16,
        tune_dim: int = 192,
        hidden_dim: int = 32,
        high_pass_area: float = 0.25,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.high_pass_area = high_pass_area
        self.patch_embed_tune = nn.Linear(embed_dim, tune_dim)
        self.high_pass_tune = nn.Linear(3 * patch_size * patch_size, tune_dim)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Linear(tune_dim, hidden_dim), nn.GELU()) for _ in range(depth + 1)
        )
        self.shared_up = nn.Linear(hidden_dim, embed_dim)

    def encode(
        self, encoder: ImageEncoderViT, x: torch.Tensor, run_block: RunBlock = _plain_block
    ) -> torch.Tensor:
        tokens = encoder.patch_embed(x) + encoder.pos_embed
        batch, height, width, _ = tokens.shape
        patches = F.unfold(
            high_pass(x, self.high_pass_area), self.patch_size, stride=self.patch_size
        )
        high = self.high_pass_tune(patches.transpose(1, 2)).reshape(batch, height, width, -1)
        task = self.patch_embed_tune(tokens) + high

        def prompt(i: int) -> torch.Tensor:  # 0 after the embedding, i + 1 after block i
            return self.shared_up(self.adapters[i](task))

        return run_blocks(encoder, tokens, prompt, len(self.adapters), run_block)
