"""The registry of SAM configurations and the one function that builds them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import CadsamError
from .checkpoint import encoder_signature, read_sam_state_dict, resolve_checkpoint
from .hf import MappedStateDict, hf_key
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

PROMPT_EMBED_DIM = 256


@dataclass(frozen=True)
class SamConfig:
    """The image encoder's shape; the prompt encoder and mask decoder are the same for all."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    pretrained: bool = True  # Meta publishes weights for it

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    # Small and random, for tests and the demo: 256 px input, 16 x 16 embedding, and a
    # window (7) that does not divide the grid, so window padding is exercised.
    "vit_tiny": SamConfig(64, 4, 2, (1, 3), image_size=256, window_size=7, pretrained=False),
}


def sam_config(backbone: str) -> SamConfig:
    if backbone not in SAM_CONFIGS:
        raise CadsamError(f"unknown backbone {backbone!r}: choose from {', '.join(SAM_CONFIGS)}")
    return SAM_CONFIGS[backbone]


def build_sam(
    backbone: str = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    fused_attention: bool = True,
    with_encoder: bool = True,
) -> Sam:
    """Build SAM for ``backbone``; with ``checkpoint`` (a path or a backbone name), load it
    strictly. Without one, the weights are random (initialised as PyTorch does).
    ``with_encoder=False`` leaves the image encoder out entirely (for cached embeddings)."""
    config = sam_config(backbone)
    grid = config.embedding_size
    encoder = (
        ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            out_chans=PROMPT_EMBED_DIM,
            window_size=config.window_size,
            global_attn_indexes=config.global_attn_indexes,
            fused_attention=fused_attention,
        )
        if with_encoder
        else None
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=PROMPT_EMBED_DIM,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, num_heads=8),
        ),
    )
    if checkpoint is not None:
        load_sam_checkpoint(sam, backbone, checkpoint)
    return sam


def load_sam_checkpoint(sam: Sam, backbone: str, checkpoint: str | os.PathLike) -> None:
    """Strictly load a checkpoint (Meta's, or a Hugging Face ``SamModel``'s, read into Meta's
    keys) into ``sam``; any mismatch is a clear error."""
    path = resolve_checkpoint(checkpoint)
    state = read_sam_state_dict(path)
    if "image_encoder.patch_embed.proj.weight" in state:
        found = encoder_signature(state)
        config = sam_config(backbone)
        if found != (config.embed_dim, config.depth):
            matches = [name for name, c in SAM_CONFIGS.items() if (c.embed_dim, c.depth) == found]
            what = matches[0] if matches else "an unknown"
            raise CadsamError(
                f"{path} holds {what} image encoder (embed dim {found[0]}, {found[1]} blocks), "
                f"not {backbone} (embed dim {config.embed_dim}, {config.depth} blocks)"
            )
    names = {}
    if isinstance(state, MappedStateDict):  # a Hugging Face file: errors name its keys
        lacking = {k: hf_key(k) for k in sam.state_dict() if k not in state}
        names = {k: name for k, name in lacking.items() if name} | state.source
    if sam.image_encoder is None:
        state = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
    load_state_strictly(sam, state, f"{path} does not match SAM {backbone}", names)


def load_state_strictly(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    mismatch: str,
    names: Mapping[str, str] | None = None,
) -> None:
    """``module.load_state_dict(state, strict=True)``, or an error that starts with
    ``mismatch`` and names the first missing, unexpected or misshapen keys (with the file's
    own name for a key where ``names`` gives one: a Hugging Face checkpoint's)."""
    names = names or {}

    def named(key: str, where: str = "in the file") -> str:
        return f"{key} ({names[key]} {where})" if key in names else key

    own = module.state_dict()
    problems = [f"missing {named(k, 'in its naming')}" for k in own if k not in state]
    problems += [f"unexpected {named(k)}" for k in state if k not in own]
    problems += [
        f"{named(k)} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CadsamError(f"{mismatch}: {'; '.join(problems[:3])}{more}")
    with torch.no_grad():
        module.load_state_dict(state, strict=True)
