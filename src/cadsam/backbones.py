"""The backbones: a name decides SAM (a ViT encoder, :mod:`cadsam.sam`) or SAM 2.1 (a Hiera
trunk with an FPN neck, :mod:`cadsam.sam2`), and what its mask decoder reads per image.

SAM's decoder reads the image embedding alone (256 x E x E). SAM 2.1's reads the embedding
(with ``no_mem_embed`` added) and two high-resolution maps, the stride-4 and stride-8 FPN levels
projected by the decoder's ``conv_s0``/``conv_s1`` (32 x 4E x 4E and 64 x 2E x 2E). A
:class:`FeatureLayout` names those parts; the model passes them as one tensor per batch (the
embedding itself for SAM, the parts flattened and concatenated for SAM 2.1), which is also one
row of an embedding cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CadsamError
from .sam import META_CHECKPOINTS, SAM_CONFIGS, Sam, SamConfig, build_sam, resolve_checkpoint
from .sam.build import PROMPT_EMBED_DIM
from .sam2 import (
    SAM2_CHECKPOINTS,
    SAM2_CONFIGS,
    Sam2,
    Sam2Config,
    build_sam2,
    resolve_sam2_checkpoint,
)

BACKBONES: tuple[str, ...] = (*SAM_CONFIGS, *SAM2_CONFIGS)
# Those Meta released weights for (not the small test configurations).
RELEASED_BACKBONES = tuple(b for b in BACKBONES if b in META_CHECKPOINTS or b in SAM2_CHECKPOINTS)
# The small random configurations, for tests and the demo: no weights were ever released.
TEST_BACKBONES = tuple(b for b in BACKBONES if b not in RELEASED_BACKBONES)
# Images per training step by default (train, bench): the paper's for SAM (ViT-B 4, ViT-H 2).
# The paper has no SAM 2.1: 4, and 2 for the large trunk, as for ViT-H.
DEFAULT_BATCH = {backbone: 4 for backbone in BACKBONES} | {"vit_h": 2, "sam2.1_hiera_l": 2}
# The square images are resized to for a new run (train's --image-size; bench's and plan's rows)
DEFAULT_IMAGE_SIZE = 512


def is_sam2(backbone: str) -> bool:
    return backbone in SAM2_CONFIGS


def backbone_config(backbone: str) -> SamConfig | Sam2Config:
    if backbone in SAM_CONFIGS:
        return SAM_CONFIGS[backbone]
    if backbone in SAM2_CONFIGS:
        return SAM2_CONFIGS[backbone]
    raise CadsamError(f"unknown backbone {backbone!r}: choose from {', '.join(BACKBONES)}")


def build_base(
    backbone: str, checkpoint: str | os.PathLike | None = None, with_encoder: bool = True
) -> Sam | Sam2:
    """The SAM that ``backbone`` names (loaded strictly from ``checkpoint`` if given), on the
    plain attention path."""
    backbone_config(backbone)  # an unknown name is an error naming every backbone
    if is_sam2(backbone):
        return build_sam2(backbone, checkpoint, with_encoder=with_encoder)
    return build_sam(backbone, checkpoint, fused_attention=False, with_encoder=with_encoder)


def resolve_base_checkpoint(spec: str | os.PathLike) -> Path:
    """A checkpoint path, or a name of Meta's SAM or SAM 2.1 releases -> a local file."""
    if str(spec) in SAM2_CHECKPOINTS:
        return resolve_sam2_checkpoint(spec)
    return resolve_checkpoint(spec)


def is_release_name(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names one of Meta's checkpoints (rather than a path)."""
    from .sam import META_CHECKPOINTS

    return str(spec) in META_CHECKPOINTS or str(spec) in SAM2_CHECKPOINTS


def base_weights_note(
    backbone: str, checkpoint: str | os.PathLike | None, random_weights: bool
) -> str | None:
    """Refuse a pretrained backbone without its weights unless random ones are asked for:
    one forgotten flag would otherwise mean hours of meaningless results. Returns a line to
    print when the weights are random, else None."""
    config = backbone_config(backbone)
    if checkpoint is not None:
        if random_weights:
            raise CadsamError("--random-weights and --checkpoint contradict each other: drop one")
        return None
    if not config.pretrained:
        return f"note: {backbone} is a small test configuration: its SAM weights are random"
    if not random_weights:
        kind = ".pt" if is_sam2(backbone) else ".pth"
        raise CadsamError(
            f"{backbone} needs its pretrained weights: --checkpoint {backbone} (downloaded once) "
            f"or a {kind} path; --random-weights to use random ones on purpose"
        )
    return f"note: SAM {backbone} with RANDOM weights (--random-weights): results mean nothing"


@dataclass(frozen=True)
class FeatureLayout:
    """What the mask decoder reads per image: named parts and their shapes, in order.

    Packed, a batch is one tensor: B x (the only part's shape) for a single part, else
    B x (the parts' sizes summed), each part flattened in turn."""

    parts: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """One image's packed shape."""
        if len(self.parts) == 1:
            return self.parts[0][1]
        return (sum(self.sizes),)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for _, shape in self.parts]

    def pack(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The parts (each B x its shape) -> B x :attr:`shape`."""
        if len(self.parts) == 1:
            return parts[0]
        return torch.cat([part.flatten(1) for part in parts], dim=1)

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """B x :attr:`shape` -> the parts (views, each B x its shape)."""
        if len(self.parts) == 1:
            return [packed]
        pieces = packed.split(self.sizes, dim=1)
        return [p.unflatten(1, shape) for p, (_, shape) in zip(pieces, self.parts, strict=True)]

    def add_to_first(self, packed: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``packed`` with ``delta`` (B x the first part's shape) added to its first part, the
        rest as it is."""
        if len(self.parts) == 1:
            return packed + delta
        first = self.sizes[0]
        head = packed[:, :first] + delta.flatten(1)
        return torch.cat((head, packed[:, first:]), dim=1)

    def describe(self) -> str:
        """e.g. ``image_embedding 256x64x64 + high_res_s0 32x256x256 + ...``."""
        return " + ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in self.parts)

    def to_json(self) -> list[list]:
        return [[name, list(shape)] for name, shape in self.parts]

    @classmethod
    def from_json(cls, parts: list[list]) -> FeatureLayout:
        return cls(tuple((str(name), tuple(int(n) for n in shape)) for name, shape in parts))


def feature_layout(backbone: str) -> FeatureLayout:
    """What ``backbone``'s mask decoder reads per image."""
    config = backbone_config(backbone)
    grid = config.embedding_size
    embedding = ("image_embedding", (PROMPT_EMBED_DIM, grid, grid))
    if not is_sam2(backbone):
        return FeatureLayout((embedding,))
    # the stride-4 and stride-8 FPN levels, after conv_s0 (C/8 channels) and conv_s1 (C/4)
    size = config.image_size
    return FeatureLayout(
        (
            embedding,
            ("high_res_s0", (PROMPT_EMBED_DIM // 8, size // 4, size // 4)),
            ("high_res_s1", (PROMPT_EMBED_DIM // 4, size // 8, size // 8)),
        )
    )
