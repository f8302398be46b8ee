"""What trains: the methods of the paper behind one interface, built by :func:`build_model`."""

from __future__ import annotations

import os
from typing import Any

from ..errors import CadsamError
from ..sam import build_sam, sam_config
from .cad import CAD_LAYOUTS, ConvAdapter
from .model import AdaptedSam
from .sam_adapter import OfficialSamAdapter, PaperSamAdapter

# Each method and the options it accepts, with their defaults.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "zero-shot": {"encoder_chunk": 1, "compile_encoder": False},
    "decoder": {"encoder_chunk": 1, "compile_encoder": False},
    "cad": {
        "adapter_size": 512,
        "cad_layout": "official",
        "encoder_chunk": 1,
        "compile_encoder": False,
        "checkpoint_adapter": False,
        "adapter_tile_mib": 128,
        "compile_tiles": "auto",
        "triton_kernels": "auto",
        "compile_blocks": "auto",
        "channels_last": True,
    },
    "sam-adapter": {"checkpoint_blocks": False},
    "sam-adapter-paper": {"checkpoint_blocks": False},
}
METHODS = tuple(METHOD_OPTIONS)
# Memory-saving paths compute the same function as the plain one:
# fused_attention: SDPA with the rel-pos bias folded into q/k (False: explicit scores);
# encoder_chunk: images per frozen-encoder call without autograd (0: the whole batch);
# compile_encoder: run the frozen encoder through torch.compile (faster after a warm-up);
# checkpoint_adapter / checkpoint_blocks: recompute adapter / encoder blocks in backward;
# adapter_tile_mib: run an adapter block band by band, keeping only its input, when its
# activation (in the dtype it is computed in) exceeds this many MiB (0: never);
# compile_tiles: fuse the banded blocks' elementwise arithmetic with torch.compile ("auto":
# on CUDA, True, False);
# triton_kernels: the banded first block as Triton kernels that never write its activation
# ("auto": on CUDA where Triton imports, True, False);
# compile_blocks: the adapter blocks that run whole (not in bands) and are not recomputed
# through torch.compile, which fuses their elementwise arithmetic ("auto": while training on
# CUDA without checkpoint_adapter, True, False);
# channels_last: the adapter's activations in NHWC, cuDNN's fast layout (False: NCHW);
# compile_decoder: the mask decoder and its upsampling through torch.compile, which fuses its
# hundreds of small kernels ("auto": while training on CUDA, True, False).
COMMON_OPTIONS = {"fused_attention": True, "compile_decoder": "auto"}
# Methods whose encoder runs frozen, outside autograd: they can train from cached embeddings.
CACHEABLE = ("zero-shot", "decoder", "cad")


def resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options with defaults filled in; an option it does not take is an error."""
    if method not in METHOD_OPTIONS:
        raise CadsamError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    accepted = {**COMMON_OPTIONS, **METHOD_OPTIONS[method]}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CadsamError(
            f"method {method} does not take {', '.join(unknown)} "
            f"(it takes: {', '.join(accepted) or 'no options'})"
        )
    resolved = {**accepted, **options}
    if method == "cad" and resolved["cad_layout"] not in CAD_LAYOUTS:
        raise CadsamError(f"cad_layout must be one of {', '.join(CAD_LAYOUTS)}")
    for name in ("compile_tiles", "triton_kernels", "compile_blocks", "compile_decoder"):
        if name in resolved and resolved[name] not in ("auto", True, False):
            raise CadsamError(f"{name} must be auto, true or false")
    if method == "cad" and resolved["compile_blocks"] is True and resolved["checkpoint_adapter"]:
        raise CadsamError(
            "compile_blocks=true does not combine with checkpoint_adapter: choose one"
        )
    return resolved


def build_model(
    method: str,
    backbone: str,
    checkpoint: str | os.PathLike | None = None,
    with_encoder: bool = True,
    **options: Any,
) -> AdaptedSam:
    """SAM for ``backbone`` (loaded from ``checkpoint`` if given) with ``method``'s additions.

    Only the method's own modules and the mask decoder are trainable (none for zero-shot).
    For ``cad``, ``model.adapter`` is the adapter alone: RGB in 0..255 at ``adapter_size``
    in, the tanh map (before the 0.1 scale) out. ``with_encoder=False`` builds no image
    encoder at all: the model then needs the embeddings passed in (from a cache).
    """
    options = resolve_options(method, options)
    if not with_encoder and method not in CACHEABLE:
        raise CadsamError(
            f"{method} acts inside the image encoder, so it cannot train from cached embeddings"
        )
    config = sam_config(backbone)
    sam = build_sam(backbone, checkpoint, options["fused_attention"], with_encoder)
    common = dict(sam=sam, method=method, backbone=backbone, options=options)
    if method == "cad":
        adapter = ConvAdapter(
            config.embedding_size,
            layout=options["cad_layout"],
            checkpoint_blocks=options["checkpoint_adapter"],
            channels_last=options["channels_last"],
            tile_mib=options["adapter_tile_mib"],
            compile_tiles=options["compile_tiles"],
            triton_kernels=options["triton_kernels"],
            compile_blocks=options["compile_blocks"],
        )
        return AdaptedSam(**common, adapter=adapter)
    if method in ("sam-adapter", "sam-adapter-paper"):
        kind = OfficialSamAdapter if method == "sam-adapter" else PaperSamAdapter
        encoder_adapter = kind(config.embed_dim, config.depth, config.patch_size)
        return AdaptedSam(**common, encoder_adapter=encoder_adapter)
    return AdaptedSam(**common)


__all__ = ["CACHEABLE", "METHODS", "METHOD_OPTIONS", "AdaptedSam", "build_model", "resolve_options"]
