"""SAM 2's mask decoder (``sam_mask_decoder.*``): SAM's, plus what SAM 2.1 configures.

* High-resolution features: ``conv_s0`` and ``conv_s1`` project the encoder's stride-4 and
  stride-8 FPN maps to 32 and 64 channels (done once per image, by :meth:`Sam2.image_features`);
  the upscaling path adds them after its first and second transposed convolution.
* An object-score token (``obj_score_token``) leads the output tokens, so it takes part in the
  transformer, and an MLP (``pred_obj_score_head``) reads it: a logit that the prompted object is
  in the image. SAM 2's image predictor does not use it to change the masks.
* The IoU head ends in a sigmoid.
* Meta's single-mask rule (``dynamic_multimask_via_stability``: its ``build_sam2`` turns it
  on for every release, and so does :func:`~cadsam.sam2.build_sam2`): in evaluation mode, a
  single-mask request gets the best of the three multimask outputs where the first mask
  token's is unstable. In training mode, always the first mask token's, as in Meta's.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: TwoWayTransformer | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        super().__init__()
        dim = transformer_dim
        self.transformer = transformer if transformer is not None else TwoWayTransformer()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.obj_score_token = nn.Embedding(1, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(dim, dim // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(dim, dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, sigmoid_output=True
        )
        self.pred_obj_score_head = MLP(dim, dim, 1, 3)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.stability_delta = dynamic_multimask_stability_delta
        self.stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor],
        every_token: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (B x M x 4H x 4W logits) and their predicted IoU (B x M, in 0..1).

        ``image_embeddings`` holds one embedding per prompt set (B x C x H x W) or one shared by
        all of them (1 x C x H x W), and ``high_res_features`` likewise ([B or 1 x C/8 x 4H x 4W,
        B or 1 x C/4 x 2H x 2W], already through ``conv_s0``/``conv_s1``).
        """
        masks, iou_pred, _ = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            high_res_features,
        )
        if every_token:  # one token per class: cadsam.methods.classes
            return masks, iou_pred
        if multimask_output:
            return masks[:, 1:], iou_pred[:, 1:]
        if self.dynamic_multimask_via_stability and not self.training:
            return self.stable_single_mask(masks, iou_pred)
        return masks[:, :1], iou_pred[:, :1]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All mask tokens' logits, their IoU predictions and the object-score logit (B x 1)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat(
            (self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight), dim=0
        )
        tokens = torch.cat((output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)
        src = image_embeddings.expand(batch, -1, -1, -1) + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1)
        _, channels, height, width = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        object_score_token_out = hs[:, 0, :]
        iou_token_out = hs[:, 1, :]
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(batch, channels, height, width)
        upconv1, norm1, act1, upconv2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        upscaled = act1(norm1(upconv1(src) + feat_s1))
        upscaled = act2(upconv2(upscaled) + feat_s0)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        masks = (hyper_in @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[-2:])
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred, self.pred_obj_score_head(object_score_token_out)

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU of the masks thresholded at +delta and at -delta (1 where both are empty)."""
        flat = mask_logits.flatten(-2)
        inner = (flat > self.stability_delta).sum(-1).float()
        outer = (flat > -self.stability_delta).sum(-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def stable_single_mask(
        self, masks: torch.Tensor, iou_pred: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The single-mask output where it is stable, else the multimask output of highest
        predicted IoU (the first of equals, as Meta's): B x 1 x h x w logits and B x 1 IoU."""
        best = iou_pred[:, 1:].argmax(dim=-1, keepdim=True) + 1  # B x 1, among all tokens
        best_iou = iou_pred.gather(1, best)
        best_masks = masks.gather(1, best[..., None, None].expand(-1, -1, *masks.shape[-2:]))
        single_masks, single_iou = masks[:, :1], iou_pred[:, :1]
        stable = self.stability_scores(single_masks) >= self.stability_thresh  # B x 1
        return (
            torch.where(stable[..., None, None], single_masks, best_masks),
            torch.where(stable, single_iou, best_iou),
        )
