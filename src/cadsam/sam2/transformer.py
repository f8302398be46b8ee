"""The two-way transformer of SAM 2's mask decoder (``sam_mask_decoder.transformer.*``).

It computes what SAM's does; only the token MLP of each block is named as Meta's generic MLP
(``mlp.layers.0/1`` rather than SAM's ``mlp.lin1/lin2``).
"""

from __future__ import annotations

from torch import nn

from ..sam.transformer import TwoWayTransformer as SamTwoWayTransformer
from .common import MLP


class TwoWayTransformer(SamTwoWayTransformer):
    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__(depth, embedding_dim, num_heads, mlp_dim, attention_downsample_rate)
        for layer in self.layers:
            layer.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=nn.ReLU)
