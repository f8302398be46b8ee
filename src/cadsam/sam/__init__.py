"""Segment Anything, implemented here with Meta's state-dict names so its checkpoints load."""

from .build import (
    SAM_CONFIGS,
    SamConfig,
    build_sam,
    load_sam_checkpoint,
    sam_config,
)
from .checkpoint import META_CHECKPOINTS, resolve_checkpoint
from .sam import Sam

__all__ = [
    "META_CHECKPOINTS",
    "SAM_CONFIGS",
    "Sam",
    "SamConfig",
    "build_sam",
    "load_sam_checkpoint",
    "resolve_checkpoint",
    "sam_config",
]
