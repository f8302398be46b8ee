"""SAM 2's image encoder: the Hiera trunk and an FPN neck (``image_encoder.trunk/neck.*``).

The neck maps every trunk stage to ``d_model`` channels with a 1 x 1 convolution
(``neck.convs.<i>.conv``, ``i = 0`` for the coarsest stage) and, on the levels listed in
``fpn_top_down_levels``, adds the coarser level upsampled 2x. SAM 2.1 adds it on the two coarsest
levels only, and then drops the coarsest (``scalp = 1``): what remains is the image embedding
(stride 16) and two finer maps (strides 4 and 8) for the mask decoder.

Meta's neck also computes sine position encodings of every level; only the video memory uses
them, so they are not computed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sam.image_encoder import RunBlock
from .hiera import Hiera


class FpnNeck(nn.Module):
    def __init__(
        self,
        d_model: int,
        backbone_channel_list: list[int],
        fpn_top_down_levels: tuple[int, ...] | None = None,
        fpn_interp_model: str = "bilinear",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList()
        for dim in backbone_channel_list:  # coarsest first, as the keys are numbered
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(dim, d_model, kernel_size=1))
            self.convs.append(lateral)
        levels = range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = tuple(levels)
        self.fpn_interp_model = fpn_interp_model

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The trunk's stages (finest first) -> ``d_model``-channel maps, finest first."""
        last = len(self.convs) - 1
        out: list[torch.Tensor] = []
        previous = None
        for i in range(last, -1, -1):  # coarse to fine
            features = self.convs[last - i](xs[i])
            if i in self.fpn_top_down_levels and previous is not None:
                # In float32, as Meta does (a no-op unless run in lower precision).
                features = features + F.interpolate(
                    previous.float(),
                    scale_factor=2.0,
                    mode=self.fpn_interp_model,
                    align_corners=None if self.fpn_interp_model == "nearest" else False,
                )
            previous = features
            out.insert(0, features)
        return out


class ImageEncoder(nn.Module):
    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if trunk.channel_list != neck.backbone_channel_list:
            raise ValueError(
                f"trunk channels {trunk.channel_list} differ from the neck's "
                f"{neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, x: torch.Tensor, run_block: RunBlock | None = None) -> list[torch.Tensor]:
        """B x 3 x S x S normalised images -> the FPN levels kept (finest first): for SAM 2.1,
        B x 256 x S/4 x S/4, B x 256 x S/8 x S/8 and the image embedding B x 256 x S/16 x S/16.
        ``run_block``: as SAM's encoder takes it."""
        features = self.neck(self.trunk(x, run_block))
        return features[: len(features) - self.scalp]
