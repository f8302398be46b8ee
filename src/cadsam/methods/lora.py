"""LoRA: low-rank updates of the image encoder's query and value projections, as SAMed places
them.

Meta's blocks project q, k and v with one fused ``qkv`` linear layer. Each block gets two
updates, ``B_q A_q x`` added to its q slice and ``B_v A_v x`` to its v slice, scaled by
``alpha / rank``; ``B`` starts at zero, so the untrained model is the base SAM exactly. Like
SAM-Adapter it acts inside the encoder, whose activations are then part of the autograd graph
(the runtime's ``checkpoint_encoder`` recomputes them per block).

The updates join through a forward hook on each ``qkv`` layer, so SAM's modules and their
state-dict names stay Meta's. :meth:`LoraAdapter.merge` folds them into the ``qkv`` weights
once, for inference: the same function with no extra work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..sam.image_encoder import ImageEncoderViT

RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class LowRank(nn.Module):
    """``B A x``: dim -> rank -> dim; ``B`` zero at first."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.a = nn.Linear(dim, rank, bias=False)
        self.b = nn.Linear(rank, dim, bias=False)
        nn.init.kaiming_uniform_(self.a.weight, a=5**0.5)  # as nn.Linear, and SAMed
        nn.init.zeros_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def delta_weight(self) -> torch.Tensor:
        return self.b.weight @ self.a.weight


class LoraAdapter(nn.Module):
    def __init__(self, encoder: ImageEncoderViT, rank: int = 4, alpha: float | None = None) -> None:
        super().__init__()
        dim = encoder.blocks[0].attn.qkv.in_features
        self.rank, self.scale = rank, (rank if alpha is None else alpha) / rank
        self.q = nn.ModuleList(LowRank(dim, rank) for _ in encoder.blocks)
        self.v = nn.ModuleList(LowRank(dim, rank) for _ in encoder.blocks)
        self.merged = False
        for i, block in enumerate(encoder.blocks):
            # (a bound method, not a closure: a deep copy of the model rebinds it to the copy)
            block.attn.qkv.register_forward_hook(functools.partial(self._updated, i))
        self.__dict__["encoder"] = encoder  # not a submodule: SAM owns it

    def _updated(
        self, index: int, qkv: nn.Linear, inputs: tuple[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        """``qkv``'s output with block ``index``'s updates on its q and v slices."""
        if self.merged:
            return out
        x = inputs[0]
        q, k, v = out.chunk(3, dim=-1)
        q = q + self.scale * self.q[index](x)
        v = v + self.scale * self.v[index](x)
        return torch.cat((q, k, v), dim=-1)

    def encode(
        self, encoder: ImageEncoderViT, x: torch.Tensor, run_block: RunBlock
    ) -> torch.Tensor:
        """Normalised encoder input -> image embedding, each block run by ``run_block``."""
        tokens = encoder.patch_embed(x) + encoder.pos_embed
        for block in encoder.blocks:
            tokens = run_block(block, tokens)
        return encoder.neck(tokens.permute(0, 3, 1, 2))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale * B A`` into each ``qkv`` weight (inference only: training the merged
        model would train the base weights, which are frozen)."""
        if self.merged:
            return
        for i, block in enumerate(self.__dict__["encoder"].blocks):
            weight = block.attn.qkv.weight
            dim = weight.shape[1]
            weight[:dim] += self.scale * self.q[i].delta_weight().to(weight.dtype)
            weight[2 * dim :] += self.scale * self.v[i].delta_weight().to(weight.dtype)
        self.merged = True
