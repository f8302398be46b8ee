"""Boxes and points for N objects per image, as the model takes them (the paper's whole-image
box needs none of this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Prompts:
    """Each image's N objects' prompts, in the pixels of the S x S square the model reads:
    ``boxes`` B x N x 4 (x0, y0, x1, y1), ``points`` B x N x P x 2 (x, y) with ``labels``
    B x N x P (1 inside the object, 0 outside). Either or both."""

    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.boxes is not None or self.points is not None, "a prompt needs a box or points"
        assert (self.points is None) == (self.labels is None), "points come with labels"

    @property
    def objects(self) -> int:
        return (self.boxes if self.boxes is not None else self.labels).shape[1]

    @classmethod
    def from_batch(cls, batch: dict[str, Any], device: torch.device) -> Prompts | None:
        """The prompts a data set's batch carries (``prompt_*``), or None (the whole image)."""
        parts = {key: batch.get(f"prompt_{key}") for key in ("boxes", "points", "labels")}
        if all(value is None for value in parts.values()):
            return None
        return cls(**{k: None if v is None else v.to(device) for k, v in parts.items()})

    def in_frame(
        self, scale: float
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """(boxes O x 4, (points O x P x 2, labels O x P)) for all B x N objects in a row,
        scaled to the encoder's frame, as SAM's prompt encoder takes them."""
        boxes = None if self.boxes is None else self.boxes.flatten(0, 1).float() * scale
        if self.points is None:
            return boxes, None
        return boxes, (self.points.flatten(0, 1).float() * scale, self.labels.flatten(0, 1))
