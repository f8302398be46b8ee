"""SAM 2.1's image path (Hiera trunk, FPN neck, prompt encoder, mask decoder with
high-resolution features), implemented here with Meta's state-dict names so its checkpoints
load."""

from ..sam.checkpoint import is_sam2_checkpoint
from .build import (
    SAM2_CONFIGS,
    VIDEO_ONLY_KEYS,
    Sam2Config,
    build_sam2,
    load_sam2_checkpoint,
    parameter_counts,
    sam2_config,
)
from .checkpoint import SAM2_CHECKPOINTS, resolve_sam2_checkpoint
from .sam2 import Sam2

__all__ = [
    "SAM2_CHECKPOINTS",
    "SAM2_CONFIGS",
    "VIDEO_ONLY_KEYS",
    "Sam2",
    "Sam2Config",
    "build_sam2",
    "is_sam2_checkpoint",
    "load_sam2_checkpoint",
    "parameter_counts",
    "resolve_sam2_checkpoint",
    "sam2_config",
]
