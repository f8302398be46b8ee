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
    "zero-shot": {},
    "decoder": {},
    "cad": {"adapter_size": 512, "cad_layout": "official"},
    "sam-adapter": {"checkpoint_blocks": False},
    "sam-adapter-paper": {"checkpoint_blocks": False},
}
METHODS = tuple(METHOD_OPTIONS)
COMMON_OPTIONS = {"fused_attention": True}


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
    return resolved


def build_model(
    method: str,
    backbone: str,
    checkpoint: str | os.PathLike | None = None,
    **options: Any,
) -> AdaptedSam:
    """SAM for ``backbone`` (loaded from ``checkpoint`` if given) with ``method``'s additions.

    Only the method's own modules and the mask decoder are trainable (none for zero-shot).
    For ``cad``, ``model.adapter`` is the adapter alone: RGB in 0..255 at ``adapter_size``
    in, the tanh map (before the 0.1 scale) out.
    """
    options = resolve_options(method, options)
    config = sam_config(backbone)
    sam = build_sam(backbone, checkpoint, fused_attention=options["fused_attention"])
    common = dict(sam=sam, method=method, backbone=backbone, options=options)
    if method == "cad":
        adapter = ConvAdapter(config.embedding_size, layout=options["cad_layout"])
        return AdaptedSam(**common, adapter=adapter, adapter_size=options["adapter_size"])
    if method in ("sam-adapter", "sam-adapter-paper"):
        kind = OfficialSamAdapter if method == "sam-adapter" else PaperSamAdapter
        encoder_adapter = kind(config.embed_dim, config.depth, config.patch_size)
        return AdaptedSam(
            **common,
            encoder_adapter=encoder_adapter,
            checkpoint_blocks=options["checkpoint_blocks"],
        )
    return AdaptedSam(**common)


__all__ = ["METHODS", "METHOD_OPTIONS", "AdaptedSam", "build_model", "resolve_options"]
