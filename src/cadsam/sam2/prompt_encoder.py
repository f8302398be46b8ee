"""SAM 2's prompt encoder (``sam_prompt_encoder.*``): SAM's, with box corners as labelled points.

The weights and the encodings are SAM's. What differs is how SAM 2's image predictor gives it a
box: as two points labelled 2 (top-left) and 3 (bottom-right), placed before any clicks, and with
no ``boxes`` argument, so a padding point (label -1) is always appended to the points (SAM's
encoder embeds such corners as it embeds a box's).
"""

from __future__ import annotations

import torch

from ..sam.prompt_encoder import PromptEncoder as SamPromptEncoder

TOP_LEFT_LABEL = 2  # a box's first corner; its second is labelled 3


class PromptEncoder(SamPromptEncoder):
    @property
    def mask_input_size(self) -> tuple[int, int]:
        """The size of a dense mask prompt: four times the embedding grid."""
        h, w = self.image_embedding_size
        return 4 * h, 4 * w


def boxes_as_points(
    boxes: torch.Tensor | None, points: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """B x 4 boxes (x0, y0, x1, y1) and optional clicks -> one labelled point set, corners first,
    as SAM 2's image predictor hands prompts to the encoder."""
    if boxes is None:
        return points
    corners = boxes.reshape(-1, 2, 2)
    # Made on the device, not copied from the CPU, so that a CUDA graph can capture it.
    labels = torch.arange(
        TOP_LEFT_LABEL, TOP_LEFT_LABEL + 2, dtype=torch.int32, device=boxes.device
    )
    labels = labels.expand(corners.shape[0], -1)
    if points is None:
        return corners, labels
    coords, point_labels = points
    return torch.cat((corners, coords), dim=1), torch.cat((labels, point_labels.to(labels)), dim=1)
