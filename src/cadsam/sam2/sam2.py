"""SAM 2.1 on single images: encoder, prompt encoder and mask decoder, as SAM 2's image
predictor runs them, with its preprocessing and its state-dict names.

For one image, SAM 2 conditions nothing on memory: its image predictor adds the learned
``no_mem_embed`` to the image embedding (``directly_add_no_mem_embed``) and decodes with the two
finer FPN maps, projected by the decoder's ``conv_s0``/``conv_s1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoder
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder, boxes_as_points

PIXEL_MEAN = (0.485, 0.456, 0.406)  # on images scaled to 0..1
PIXEL_STD = (0.229, 0.224, 0.225)


class Sam2(nn.Module):
    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: ImageEncoder | None,
        sam_prompt_encoder: PromptEncoder,
        sam_mask_decoder: MaskDecoder,
    ) -> None:
        """``image_encoder`` may be None when features come from elsewhere (a cache)."""
        super().__init__()
        self.image_encoder = image_encoder
        self.image_size = sam_prompt_encoder.input_image_size[0]
        hidden_dim = sam_prompt_encoder.embed_dim
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        self.sam_prompt_encoder = sam_prompt_encoder
        self.sam_mask_decoder = sam_mask_decoder
        # Not part of Meta's state_dict: constants, not weights.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """SAM's name for it (``sam_prompt_encoder`` in Meta's keys)."""
        return self.sam_prompt_encoder

    @property
    def mask_decoder(self) -> MaskDecoder:
        """SAM's name for it (``sam_mask_decoder`` in Meta's keys)."""
        return self.sam_mask_decoder

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in 0..255 (B x 3 x h x w, any size) -> encoder input, as SAM 2's transforms do:
        scaled to 0..1, resized to ``image_size`` x ``image_size`` (bilinear, antialiased; the
        aspect ratio is not kept and nothing is padded), normalised with ImageNet's mean/std."""
        x = images.float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                (self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return (x - self.pixel_mean) / self.pixel_std

    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images -> the FPN levels SAM 2.1 keeps, finest first (strides 4, 8, 16),
        before the decoder's projections."""
        assert self.image_encoder is not None, "built without an encoder: pass features"
        return self.image_encoder(images)

    def project_features(
        self, backbone_fpn: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """FPN levels -> (image embedding + ``no_mem_embed``, [``conv_s0`` of the stride-4
        level, ``conv_s1`` of the stride-8 level]). ``conv_s0``/``conv_s1`` are decoder weights:
        run this inside the graph when they are trained."""
        fine, middle, coarse = backbone_fpn
        image_embed = coarse + self.no_mem_embed.view(1, -1, 1, 1)
        decoder = self.sam_mask_decoder
        return image_embed, [decoder.conv_s0(fine), decoder.conv_s1(middle)]

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised B x 3 x S x S images -> (image embedding B x 256 x S/16 x S/16 with
        ``no_mem_embed`` added, [B x 32 x S/4 x S/4, B x 64 x S/8 x S/8]): what SAM 2's image
        predictor keeps per image."""
        return self.project_features(self.backbone_features(images))

    def whole_image_boxes(self, batch: int) -> torch.Tensor:
        """One box per image covering the whole encoder frame: B x 4."""
        boxes = self.pixel_mean.new_zeros(batch, 4)
        boxes[:, 2:] = self.image_size
        return boxes

    def decode(
        self,
        image_embed: torch.Tensor,
        high_res_features: list[torch.Tensor],
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        every_token: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features + prompts (in the encoder's frame) -> low-res logits (B x M x S/4 x S/4)
        and predicted IoU (B x M). Boxes join the points as labelled corners, as SAM 2's image
        predictor passes them; ``mask_inputs`` is B x 1 x S/4 x S/4 logits."""
        sparse, dense = self.sam_prompt_encoder(
            points=boxes_as_points(boxes, points), boxes=None, masks=mask_inputs
        )
        return self.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_res_features=high_res_features,
            every_token=every_token,
        )

    def postprocess_masks(
        self, masks: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits -> logits at the original image size (one bilinear resize: there is no
        padding to undo)."""
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
