"""CAD: the parallel convolutional adapter, as the authors' code builds it.

It reads the image (RGB 0..255 at adapter resolution) beside SAM's frozen encoder and returns
a tanh map the size of the image embedding; the model adds ``0.1 *`` that map to the
embedding, so training keeps none of the encoder's activations.

1. The input: the image and the magnitude of its high-frequency component (the spectrum
   with a centred low-frequency square zeroed), each channel divided by its maximum.
2. ``conv_up``: a 1 x 1 convolution from those 6 channels to 256.
3. Three blocks, each halving the resolution. Two layouts share the parameter count:

   * ``official`` (default, what produced the paper's tables): 3 x 3 convolution of dilation
     2 -> BatchNorm -> LeakyReLU(0.1) -> + block input -> 2 x 2 average pooling; every block's
     output is pooled to the embedding size and the three are summed;
   * ``paper`` (the paper's text): 3 x 3 convolution -> LeakyReLU(0.1) -> BatchNorm -> 2 x 2
     average pooling, no residual; only the last block's output is pooled to the embedding.

4. tanh.

This is the reference path. The leaner and faster ways of running the same function (bands,
Triton kernels, compiled blocks) live in :mod:`cadsam.fast` and are tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..frequency import high_pass

CAD_LAYOUTS = ("official", "paper")
NEGATIVE_SLOPE = 0.1  # the blocks' LeakyReLU


class ConvAdapter(nn.Module):
    def __init__(
        self,
        embedding_size: int,
        embed_dim: int = 256,
        num_blocks: int = 3,
        layout: str = "official",
        high_pass_area: float = 0.25,
    ) -> None:
        super().__init__()
        if layout not in CAD_LAYOUTS:
            raise ValueError(f"unknown CAD layout {layout!r}: choose from {CAD_LAYOUTS}")
        self.embedding_size = embedding_size
        self.layout = layout
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
        x = self.conv_up(x)
        if self.layout == "paper":
            for block in self.blocks:
                x = block(x)
            return torch.tanh(pool_to(x, self.embedding_size))
        pooled = []  # every block's output, pooled to the embedding size
        for block in self.blocks:
            x = block(x)
            pooled.append(pool_to(x, self.embedding_size))
        return torch.tanh(sum(pooled[1:], pooled[0]))


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool a map to size x size, as ``nn.AdaptiveAvgPool2d`` does."""
    return F.adaptive_avg_pool2d(x, size)


class ResidualDilatedBlock(nn.Module):
    """conv 3x3 (dilation 2) -> BN -> LeakyReLU(0.1) -> + input -> AvgPool 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.bn(self.conv(x)), NEGATIVE_SLOPE)
        return F.avg_pool2d(y + x, 2)


class PaperBlock(nn.Module):
    """conv 3x3 -> LeakyReLU(0.1) -> BN -> AvgPool 2, as the paper's text describes it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.bn(F.leaky_relu(self.conv(x), NEGATIVE_SLOPE)), 2)
