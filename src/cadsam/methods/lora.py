"""LoRA: low-rank updates of the image encoder's query and value projections, as SAMed places
them.

Meta's blocks project q, k and v with one fused ``qkv`` linear layer. Each block gets two
updates, ``B_q A_q x`` added to its q slice and ``B_v A_v x`` to its v slice, scaled by
``alpha / rank``; ``B`` starts at zero, so the untrained model is the base SAM exactly. Like
SAM-Adapter it acts inside the encoder, whose activations are then part of the autograd graph
(the runtime's ``checkpoint_encoder`` recomputes them per block).

SAM 2.1's Hiera blocks have a fused ``qkv`` too, from the block's input width to three times
its output width (wider in the first block of a stage): q, k and v are its three equal slices,
so the updates map the input width to the output width, and q's is added before the queries
are pooled, as a change of the ``qkv`` weights would be.

The updates join through a forward hook on each ``qkv`` layer, so SAM's modules and their
state-dict names stay Meta's. :meth:`LoraAdapter.merge` folds them into the ``qkv`` weights
once, for inference: the same function with no extra work.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..sam.image_encoder import ImageEncoderViT, RunBlock
from ..sam2.image_encoder import ImageEncoder as HieraEncoder


class LowRank(nn.Module):
    """``B A x``: dim -> rank -> dim_out; ``B`` zero at first."""

    def __init__(self, dim: int, rank: int, dim_out: int) -> None:
        super().__init__()
        self.a = nn.Linear(dim, rank, bias=False)
        self.b = nn.Linear(rank, dim_out, bias=False)
        nn.init.kaiming_uniform_(self.a.weight, a=5**0.5)  # as nn.Linear, and SAMed
        nn.init.zeros_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def delta_weight(self) -> torch.Tensor:
        return self.b.weight @ self.a.weight


def encoder_blocks(encoder: ImageEncoderViT | HieraEncoder) -> nn.ModuleList:
    """The blocks whose ``attn.qkv`` LoRA updates: the ViT's, or the Hiera trunk's."""
    return encoder.trunk.blocks if isinstance(encoder, HieraEncoder) else encoder.blocks


class LoraAdapter(nn.Module):
    def __init__(
        self, encoder: ImageEncoderViT | HieraEncoder, rank: int = 4, alpha: float | None = None
    ) -> None:
        super().__init__()
        blocks = encoder_blocks(encoder)
        shapes = [(b.attn.qkv.in_features, b.attn.qkv.out_features // 3) for b in blocks]
        self.rank, self.scale = rank, (rank if alpha is None else alpha) / rank
        self.q = nn.ModuleList(LowRank(dim, rank, dim_out) for dim, dim_out in shapes)
        self.v = nn.ModuleList(LowRank(dim, rank, dim_out) for dim, dim_out in shapes)
        self.merged = False
        for i, block in enumerate(blocks):
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
        self, encoder: ImageEncoderViT | HieraEncoder, x: torch.Tensor, run_block: RunBlock
    ) -> torch.Tensor | list[torch.Tensor]:
        """Normalised encoder input -> the encoder's output (SAM's image embedding, SAM 2.1's
        FPN levels), each block run by ``run_block``."""
        return encoder(x, run_block)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale * B A`` into each ``qkv`` weight (inference only: training the merged
        model would train the base weights, which are frozen)."""
        if self.merged:
            return
        for i, block in enumerate(encoder_blocks(self.__dict__["encoder"])):
            weight = block.attn.qkv.weight
            dim_out = weight.shape[0] // 3
            weight[:dim_out] += self.scale * self.q[i].delta_weight().to(weight.dtype)
            weight[2 * dim_out :] += self.scale * self.v[i].delta_weight().to(weight.dtype)
        self.merged = True
