"""The registry of SAM 2.1 configurations and the one function that builds them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import CadsamError
from ..sam.build import PROMPT_EMBED_DIM, load_state_strictly  # 256 in both SAMs
from .checkpoint import read_sam2_state_dict, resolve_sam2_checkpoint, trunk_signature
from .hiera import Hiera
from .image_encoder import FpnNeck, ImageEncoder
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam2 import Sam2
from .transformer import TwoWayTransformer

BACKBONE_STRIDE = 16  # of the image embedding
# The neck, as every SAM 2.1 configuration has it.
FPN_TOP_DOWN_LEVELS = (2, 3)
FPN_INTERP_MODEL = "nearest"
SCALP = 1

# What Meta's checkpoints hold for video only (memory attention and encoder, object pointers,
# temporal encodings): not built here, and skipped by name when loading. Everything else in the
# file must match the image path exactly.
VIDEO_ONLY_KEYS = (
    "memory_attention",
    "memory_encoder",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
    "mask_downsample",
    "obj_ptr_proj",
    "obj_ptr_tpos_proj",
)


@dataclass(frozen=True)
class Sam2Config:
    """The Hiera trunk's shape, as in Meta's ``configs/sam2.1/*.yaml``; the neck, prompt encoder
    and mask decoder are the same for all."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...] = (2, 3, 16, 3)
    global_att_blocks: tuple[int, ...] = (12, 16, 20)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
    image_size: int = 1024
    pretrained: bool = True  # Meta publishes weights for it
    # Meta's single-mask rule, which its build_sam2 adds to every release's yaml (its
    # apply_postprocessing, on by default, and so in SAM2ImagePredictor): at inference, a first
    # mask token whose output is unstable (stability: the IoU of its logits thresholded at +delta
    # and at -delta, below thresh) gives way to the multimask output of highest predicted IoU.
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def backbone_channel_list(self) -> list[int]:
        """The trunk's stage widths, coarsest first (the neck's order)."""
        return [self.embed_dim * 2**i for i in reversed(range(len(self.stages)))]

    @property
    def embedding_size(self) -> int:
        return self.image_size // BACKBONE_STRIDE


# Parameters of the image path (trunk + neck + prompt encoder + mask decoder + no_mem_embed):
# t 31,440,721; s 38,538,577; b+ 73,328,401; l 216,924,865; the test configuration 4,841,905.
# The mask decoder has 4,215,109 of them in each (conv_s0 and conv_s1: 24,672), the prompt
# encoder 6,220. tests/test_sam2.py pins them.
SAM2_CONFIGS: dict[str, Sam2Config] = {
    "sam2.1_hiera_t": Sam2Config(
        96, 1, (1, 2, 7, 2), (5, 7, 9), window_pos_embed_bkg_spatial_size=(7, 7)
    ),
    "sam2.1_hiera_s": Sam2Config(
        96, 1, (1, 2, 11, 2), (7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7)
    ),
    "sam2.1_hiera_b+": Sam2Config(112, 2),
    "sam2.1_hiera_l": Sam2Config(
        144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), window_pos_embed_bkg_spatial_size=(7, 7)
    ),
    # Small and random, for tests and the demo: 256 px input (a 16 x 16 embedding), four
    # stages of 1, 2, 3, 2 blocks, one global block, and a window (6) that does not divide its
    # 16 x 16 grid, so padded windows are exercised, with and without query pooling.
    "sam2.1_hiera_tiny_test": Sam2Config(
        16, 1, (1, 2, 3, 2), (5,), (8, 4, 6, 4), (7, 7), image_size=256, pretrained=False
    ),
}


def sam2_config(backbone: str) -> Sam2Config:
    if backbone not in SAM2_CONFIGS:
        raise CadsamError(f"unknown backbone {backbone!r}: choose from {', '.join(SAM2_CONFIGS)}")
    return SAM2_CONFIGS[backbone]


def build_image_encoder(config: Sam2Config) -> ImageEncoder:
    trunk = Hiera(
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
        stages=config.stages,
        global_att_blocks=config.global_att_blocks,
        window_spec=config.window_spec,
        window_pos_embed_bkg_spatial_size=config.window_pos_embed_bkg_spatial_size,
    )
    neck = FpnNeck(
        d_model=PROMPT_EMBED_DIM,
        backbone_channel_list=config.backbone_channel_list,
        fpn_top_down_levels=FPN_TOP_DOWN_LEVELS,
        fpn_interp_model=FPN_INTERP_MODEL,
    )
    return ImageEncoder(trunk, neck, scalp=SCALP)


def build_sam2(
    backbone: str = "sam2.1_hiera_t",
    checkpoint: str | os.PathLike | None = None,
    with_encoder: bool = True,
) -> Sam2:
    """Build SAM 2.1's image path for ``backbone``; with ``checkpoint`` (a path or a backbone
    name), load it strictly. Without one, the weights are random (initialised as PyTorch does).
    ``with_encoder=False`` leaves the image encoder out (for cached features). The decoder
    follows the configuration's single-mask rule, as Meta's ``build_sam2`` builds it (see
    :class:`MaskDecoder`; the trained methods switch it off, see :class:`AdaptedSam`)."""
    config = sam2_config(backbone)
    grid = config.embedding_size
    sam2 = Sam2(
        image_encoder=build_image_encoder(config) if with_encoder else None,
        sam_prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
        ),
        sam_mask_decoder=MaskDecoder(
            transformer_dim=PROMPT_EMBED_DIM,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, num_heads=8),
            dynamic_multimask_via_stability=config.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=config.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=config.dynamic_multimask_stability_thresh,
        ),
    )
    if checkpoint is not None:
        load_sam2_checkpoint(sam2, backbone, checkpoint)
    return sam2


def is_video_only(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in VIDEO_ONLY_KEYS)


def load_sam2_checkpoint(sam2: Sam2, backbone: str, checkpoint: str | os.PathLike) -> None:
    """Strictly load a Meta-format SAM 2.1 checkpoint into ``sam2``: every image-path weight
    must be there with its shape, and nothing else but the video-only weights."""
    path = resolve_sam2_checkpoint(checkpoint)
    state = read_sam2_state_dict(path)
    _check_backbone(state, backbone, path)
    state = {k: v for k, v in state.items() if not is_video_only(k)}
    if sam2.image_encoder is None:
        state = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
    load_state_strictly(sam2, state, f"{path} does not match {backbone}")


def _check_backbone(state: dict[str, torch.Tensor], backbone: str, path: os.PathLike) -> None:
    """Name the mix-ups: another backbone's trunk, or SAM 2.0's weights for SAM 2.1."""
    config = sam2_config(backbone)
    if "image_encoder.trunk.patch_embed.proj.weight" in state:
        found = trunk_signature(state)
        if found != (config.embed_dim, config.depth):
            matches = [n for n, c in SAM2_CONFIGS.items() if (c.embed_dim, c.depth) == found]
            what = matches[0] if matches else "an unknown"
            raise CadsamError(
                f"{path} holds {what} trunk (embed dim {found[0]}, {found[1]} blocks), "
                f"not {backbone} (embed dim {config.embed_dim}, {config.depth} blocks)"
            )
    if any(k.startswith("memory_attention.") for k in state) and (
        "no_obj_embed_spatial" not in state
    ):
        raise CadsamError(
            f"{path} holds SAM 2.0 weights (no no_obj_embed_spatial): {backbone} needs "
            "Meta's SAM 2.1 release (sam2.1_hiera_*.pt)"
        )


def parameter_counts(sam2: Sam2) -> dict[str, int]:
    """Parameters of the image path and of its parts; ``mask_decoder_high_res`` is the share of
    ``conv_s0``/``conv_s1`` in ``mask_decoder``."""

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    decoder = sam2.sam_mask_decoder
    return {
        "total": count(sam2),
        "image_encoder": count(sam2.image_encoder) if sam2.image_encoder is not None else 0,
        "prompt_encoder": count(sam2.sam_prompt_encoder),
        "mask_decoder": count(decoder),
        "mask_decoder_high_res": count(decoder.conv_s0) + count(decoder.conv_s1),
        "no_mem_embed": sam2.no_mem_embed.numel(),
    }
