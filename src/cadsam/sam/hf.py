"""Hugging Face ``transformers`` ``SamModel`` checkpoints, read into Meta's key names.

A ``SamModel`` saved by ``save_pretrained`` (``model.safetensors`` or ``pytorch_model.bin``,
such as ``facebook/sam-vit-base``, ``-large``, ``-huge``) holds the same tensors as Meta's
``.pth`` under other names; no tensor is reshaped (the encoder's attention projects q, k and v
with one fused ``qkv`` layer in both). The names differ as follows (HF -> Meta):

* ``vision_encoder.`` -> ``image_encoder.``; ``layers.N`` -> ``blocks.N``;
  ``patch_embed.projection`` -> ``patch_embed.proj``; ``layer_norm1/2`` -> ``norm1/2``;
  ``neck.conv1``, ``neck.layer_norm1``, ``neck.conv2``, ``neck.layer_norm2`` -> ``neck.0..3``;
* ``prompt_encoder.shared_embedding.positional_embedding`` and its tied twin
  ``shared_image_embedding.positional_embedding`` (the one HF uses for the image-wide
  positional encoding; ``save_pretrained`` writes only one of the two) ->
  ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``, which Meta uses for both;
  ``point_embed.N`` -> ``point_embeddings.N``; ``mask_embed.conv1``, ``layer_norm1``,
  ``conv2``, ``layer_norm2``, ``conv3`` -> ``mask_downscaling.0``, ``1``, ``3``, ``4``, ``6``;
* ``mask_decoder.upscale_conv1``, ``upscale_layer_norm``, ``upscale_conv2`` ->
  ``output_upscaling.0``, ``1``, ``3``; the heads' ``proj_in``, ``layers.0``, ``proj_out`` ->
  ``layers.0``, ``1``, ``2``; the two-way transformer's ``layer_norm1..4`` -> ``norm1..4`` and
  ``layer_norm_final_attn`` -> ``norm_final_attn``.

Every key of the file must be one of these, and every Meta key must come from one: the shapes
are then checked against the backbone by :func:`cadsam.sam.build.load_sam_checkpoint`.
"""

from __future__ import annotations

import re

import torch

from ..errors import CadsamError

POSITIONAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
WB = r"(weight|bias)"
HEAD = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)"  # SAM's three-layer MLPs

# (HF key pattern, Meta key template): each pattern matches a whole key.
RULES: tuple[tuple[str, str], ...] = (
    (rf"vision_encoder\.patch_embed\.projection\.{WB}", r"image_encoder.patch_embed.proj.\1"),
    (r"vision_encoder\.pos_embed", "image_encoder.pos_embed"),
    (
        rf"vision_encoder\.layers\.(\d+)\.layer_norm([12])\.{WB}",
        r"image_encoder.blocks.\1.norm\2.\3",
    ),
    (
        rf"vision_encoder\.layers\.(\d+)\.attn\.(qkv|proj)\.{WB}",
        r"image_encoder.blocks.\1.attn.\2.\3",
    ),
    (
        r"vision_encoder\.layers\.(\d+)\.attn\.rel_pos_([hw])",
        r"image_encoder.blocks.\1.attn.rel_pos_\2",
    ),
    (rf"vision_encoder\.layers\.(\d+)\.mlp\.(lin[12])\.{WB}", r"image_encoder.blocks.\1.mlp.\2.\3"),
    (r"vision_encoder\.neck\.conv1\.weight", "image_encoder.neck.0.weight"),
    (rf"vision_encoder\.neck\.layer_norm1\.{WB}", r"image_encoder.neck.1.\1"),
    (r"vision_encoder\.neck\.conv2\.weight", "image_encoder.neck.2.weight"),
    (rf"vision_encoder\.neck\.layer_norm2\.{WB}", r"image_encoder.neck.3.\1"),
    (r"prompt_encoder\.shared_embedding\.positional_embedding", POSITIONAL),
    (r"shared_image_embedding\.positional_embedding", POSITIONAL),
    (rf"prompt_encoder\.mask_embed\.conv1\.{WB}", r"prompt_encoder.mask_downscaling.0.\1"),
    (rf"prompt_encoder\.mask_embed\.layer_norm1\.{WB}", r"prompt_encoder.mask_downscaling.1.\1"),
    (rf"prompt_encoder\.mask_embed\.conv2\.{WB}", r"prompt_encoder.mask_downscaling.3.\1"),
    (rf"prompt_encoder\.mask_embed\.layer_norm2\.{WB}", r"prompt_encoder.mask_downscaling.4.\1"),
    (rf"prompt_encoder\.mask_embed\.conv3\.{WB}", r"prompt_encoder.mask_downscaling.6.\1"),
    (r"prompt_encoder\.point_embed\.(\d+)\.weight", r"prompt_encoder.point_embeddings.\1.weight"),
    (r"prompt_encoder\.(no_mask_embed|not_a_point_embed)\.weight", r"prompt_encoder.\1.weight"),
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    (rf"mask_decoder\.upscale_conv1\.{WB}", r"mask_decoder.output_upscaling.0.\1"),
    (rf"mask_decoder\.upscale_layer_norm\.{WB}", r"mask_decoder.output_upscaling.1.\1"),
    (rf"mask_decoder\.upscale_conv2\.{WB}", r"mask_decoder.output_upscaling.3.\1"),
    (rf"mask_decoder\.{HEAD}\.proj_in\.{WB}", r"mask_decoder.\1.layers.0.\2"),
    (rf"mask_decoder\.{HEAD}\.layers\.0\.{WB}", r"mask_decoder.\1.layers.1.\2"),
    (rf"mask_decoder\.{HEAD}\.proj_out\.{WB}", r"mask_decoder.\1.layers.2.\2"),
    (
        rf"mask_decoder\.transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\.([qkv]_proj|out_proj)\.{WB}",
        r"mask_decoder.transformer.layers.\1.\2.\3.\4",
    ),
    (
        rf"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm([1-4])\.{WB}",
        r"mask_decoder.transformer.layers.\1.norm\2.\3",
    ),
    (
        rf"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.{WB}",
        r"mask_decoder.transformer.layers.\1.mlp.\2.\3",
    ),
    (
        rf"mask_decoder\.transformer\.final_attn_token_to_image\.([qkv]_proj|out_proj)\.{WB}",
        r"mask_decoder.transformer.final_attn_token_to_image.\1.\2",
    ),
    (
        rf"mask_decoder\.transformer\.layer_norm_final_attn\.{WB}",
        r"mask_decoder.transformer.norm_final_attn.\1",
    ),
)
_COMPILED = tuple((re.compile(pattern), template) for pattern, template in RULES)
HF_PREFIXES = ("vision_encoder.", "shared_image_embedding.", "prompt_encoder.shared_embedding.")


class MappedStateDict(dict):
    """A state_dict under Meta's keys that remembers each key's name in the file it came from,
    so errors name what the user can find there."""

    source: dict[str, str]


def is_hf_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state_dict is laid out as ``transformers``' ``SamModel`` saves it."""
    return any(key.startswith(HF_PREFIXES) for key in state)


def meta_key(hf_key: str) -> str | None:
    """Meta's name for an HF ``SamModel`` key, or None if it is none of SAM's."""
    for pattern, template in _COMPILED:
        match = pattern.fullmatch(hf_key)
        if match:
            return match.expand(template)
    return None


def hf_key(meta: str) -> str | None:
    """The HF ``SamModel`` name of a Meta key (RULES read backwards), or None: for errors that
    name a key the file lacks."""
    for pattern, template in RULES:
        groups = re.findall(r"\(([^()]*)\)", pattern)  # the capture groups, in order
        parts = re.split(r"\\(\d)", template)  # literal, group number, literal, ...
        regex = "".join(
            re.escape(part) if i % 2 == 0 else f"({groups[int(part) - 1]})"
            for i, part in enumerate(parts)
        )
        match = re.fullmatch(regex, meta)
        if match:
            values = dict(zip(parts[1::2], match.groups(), strict=True))
            in_order = [values[str(n)] for n in range(1, len(groups) + 1)]
            return re.sub(r"\([^()]*\)", "{}", pattern).replace("\\.", ".").format(*in_order)
    return None


def from_hf(state: dict[str, torch.Tensor], path: object) -> MappedStateDict:
    """Rename an HF ``SamModel`` state_dict to Meta's keys, strictly: a key that is not
    SAM's, or tied positional embeddings that differ, is a :class:`CadsamError`."""
    mapped = MappedStateDict()
    mapped.source = {}
    unknown = []
    for key, tensor in state.items():
        target = meta_key(key)
        if target is None:
            unknown.append(key)
        elif target in mapped:  # the tied positional embedding, written twice
            if mapped[target].shape != tensor.shape or not torch.equal(mapped[target], tensor):
                raise CadsamError(
                    f"{path}: {mapped.source[target]} and {key} differ, but SAM has one "
                    "positional embedding for both"
                )
        else:
            mapped[target] = tensor
            mapped.source[target] = key
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise CadsamError(
            f"{path} is a Hugging Face checkpoint but not of a SAM SamModel: unknown keys "
            f"{', '.join(sorted(unknown)[:3])}{more}"
        )
    return mapped
