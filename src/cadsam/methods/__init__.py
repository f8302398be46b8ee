"""What trains: the methods of the paper behind one interface, built by :func:`build_model`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ..backbones import backbone_config, build_base, is_sam2
from ..data.labels import ClassTable
from ..errors import CadsamError
from ..fast.runtime import Runtime
from .cad import CAD_LAYOUTS, ConvAdapter
from .lora import LoraAdapter
from .model import AdaptedSam
from .sam_adapter import OfficialSamAdapter, PaperSamAdapter

# Each method and its model options (what is trained: saved with the weights), with their
# defaults. How a model runs is not among them: that is a :class:`~cadsam.fast.runtime.Runtime`.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "zero-shot": {},
    "decoder": {},
    "cad": {"adapter_size": 512, "cad_layout": "official"},
    "sam-adapter": {},
    "sam-adapter-paper": {},
    "lora": {"lora_rank": 4, "lora_alpha": None},  # alpha None: the rank (scale 1)
}
METHODS = tuple(METHOD_OPTIONS)
# Methods whose encoder runs frozen, outside autograd: they can train from cached embeddings.
CACHEABLE = ("zero-shot", "decoder", "cad")


def resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options with defaults filled in; an option it does not take is an error."""
    if method not in METHOD_OPTIONS:
        raise CadsamError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    accepted = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes no options"
        raise CadsamError(f"method {method} does not take {', '.join(unknown)} ({takes})")
    resolved = {**accepted, **options}
    if method == "cad":
        if resolved["cad_layout"] not in CAD_LAYOUTS:
            raise CadsamError(f"cad_layout must be one of {', '.join(CAD_LAYOUTS)}")
        size = resolved["adapter_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise CadsamError(f"adapter_size must be a whole number of pixels >= 8, not {size!r}")
    if method == "lora":
        rank, alpha = resolved["lora_rank"], resolved["lora_alpha"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise CadsamError(f"lora_rank must be a whole number >= 1, not {rank!r}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
            raise CadsamError(f"lora_alpha must be a number, not {alpha!r}")
    return resolved


# Runtime settings that act on a part only some methods have, and those methods. Named for a
# method without the part (--set, a config's runtime:), a setting would change nothing, so it
# is an error there; the named runtimes set them all and each method uses its own.
IN_ENCODER = tuple(method for method in METHODS if method not in CACHEABLE)
PART_SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "checkpoint_encoder": ("the encoder blocks that train inside autograd", IN_ENCODER),
    **{
        name: ("CAD's adapter", ("cad",))
        for name in (
            "checkpoint_adapter",
            "adapter_tile_mib",
            "compile_tiles",
            "triton_kernels",
            "compile_blocks",
            "channels_last",
        )
    },
}


def check_runtime_settings(method: str, names: Iterable[str]) -> None:
    """Runtime settings given by name for ``method``: each must act on a part it has."""
    for name in names:
        if name not in PART_SETTINGS:
            continue  # a setting every method uses
        part, methods = PART_SETTINGS[name]
        if method not in methods:
            raise CadsamError(
                f"runtime setting {name} acts on {part}, which method {method} does not have "
                f"(it is for: {', '.join(methods)})"
            )


# why SAM-Adapter's methods are SAM 1 only, wherever that is said
SAM1_ONLY_WHY = "SAM-Adapter prompts the tokens of SAM's ViT encoder; SAM 2.1 has a Hiera trunk"


def runs_on(method: str, backbone: str) -> bool:
    """Whether ``method`` exists on ``backbone`` (SAM1_ONLY_WHY)."""
    return not (method.startswith("sam-adapter") and is_sam2(backbone))


def check_method_on_backbone(method: str, backbone: str) -> None:
    if not runs_on(method, backbone):
        raise CadsamError(
            f"SAM-Adapter is SAM 1 only ({SAM1_ONLY_WHY}): on {backbone}, use cad, decoder or lora"
        )


def build_model(
    method: str,
    backbone: str,
    checkpoint: str | os.PathLike | None = None,
    with_encoder: bool = True,
    runtime: Runtime | None = None,
    classes: ClassTable | None = None,
    **options: Any,
) -> AdaptedSam:
    """SAM or SAM 2.1, as ``backbone`` names it (loaded from ``checkpoint`` if given), with
    ``method``'s additions; ``options``: the method's model options.

    Only the method's own modules and the mask decoder are trainable (none for zero-shot; on
    SAM 2.1 not the decoder's ``conv_s0``/``conv_s1``, see :class:`AdaptedSam`).
    For ``cad``, ``model.adapter`` is the adapter alone: RGB in 0..255 at ``adapter_size``
    in, the tanh map (before the 0.1 scale) out. ``with_encoder=False`` builds no image
    encoder at all: the model then needs the embeddings passed in (from a cache). The model
    runs on the plain path unless a ``runtime`` is given (:func:`cadsam.fast.runner.fit`).
    ``classes``: K classes (:mod:`.classes`); None, the binary task.
    """
    options = resolve_options(method, options)
    config = backbone_config(backbone)
    if not with_encoder and method not in CACHEABLE:
        raise CadsamError(
            f"{method} acts inside the image encoder, so it cannot train from cached embeddings"
        )
    check_method_on_backbone(method, backbone)
    if classes is not None and method == "zero-shot":
        raise CadsamError("zero-shot SAM predicts one mask: several classes need a trained method")
    sam = build_base(backbone, checkpoint, with_encoder=with_encoder)
    common = dict(sam=sam, method=method, backbone=backbone, options=options, classes=classes)
    if method == "cad":
        adapter = ConvAdapter(config.embedding_size, layout=options["cad_layout"])
        model = AdaptedSam(**common, adapter=adapter)
    elif method in ("sam-adapter", "sam-adapter-paper"):
        kind = OfficialSamAdapter if method == "sam-adapter" else PaperSamAdapter
        encoder_adapter = kind(config.embed_dim, config.depth, config.patch_size)
        model = AdaptedSam(**common, encoder_adapter=encoder_adapter)
    elif method == "lora":
        lora = LoraAdapter(sam.image_encoder, options["lora_rank"], options["lora_alpha"])
        model = AdaptedSam(**common, encoder_adapter=lora)
    else:
        model = AdaptedSam(**common)
    if runtime is not None:
        from ..fast.runner import fit  # how it runs: the one place that knows the fast paths

        fit(model, runtime)
    return model


__all__ = [
    "CACHEABLE",
    "METHODS",
    "METHOD_OPTIONS",
    "SAM1_ONLY_WHY",
    "AdaptedSam",
    "build_model",
    "check_method_on_backbone",
    "resolve_options",
    "runs_on",
]
