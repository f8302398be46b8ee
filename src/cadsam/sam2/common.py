"""Small layers shared by SAM 2's trunk and heads."""

from __future__ import annotations

import torch
from torch import nn

from ..sam.common import LayerNorm2d

__all__ = ["MLP", "LayerNorm2d"]


class MLP(nn.Module):
    """``num_layers`` linear layers (``layers.<i>`` in Meta's keys) with an activation between
    them, and optionally a sigmoid on the output. SAM 2 uses it everywhere SAM used
    ``MLPBlock`` or its decoder's MLP."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else self.act(layer(x))
        return torch.sigmoid(x) if self.sigmoid_output else x
