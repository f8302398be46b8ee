"""Segment Anything: the three parts together, with SAM's input normalisation and prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: ImageEncoderViT | None,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
    ) -> None:
        """``image_encoder`` may be None when embeddings come from elsewhere (a cache)."""
        super().__init__()
        self.image_encoder = image_encoder
        self.image_size = prompt_encoder.input_image_size[0]
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not part of Meta's state_dict: constants, not weights.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in 0..255 (B x 3 x h x w, longest side already ``image_size``) -> encoder input.

        Normalises with SAM's pixel mean and std, then zero-pads bottom and right to a square.
        """
        x = (images - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def whole_image_boxes(self, batch: int) -> torch.Tensor:
        """One box per image covering the whole encoder frame, the paper's prompt: B x 4."""
        boxes = self.pixel_mean.new_zeros(batch, 4)  # made on the device: no copy from the CPU
        boxes[:, 2:] = self.image_size
        return boxes

    def decode(
        self,
        image_embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        every_token: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings + prompts (in the encoder's frame) -> low-res logits and IoU predictions
        (``every_token``: every mask token's, one per class)."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            every_token=every_token,
        )

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Low-res logits -> logits at the original image size (undoing resize and padding)."""
        masks = F.interpolate(
            masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
