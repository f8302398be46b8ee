"""What several commands do with their flags: the runtime they ask for, and the model they
name (trained weights, or zero-shot SAM)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..api import runtime_for
from ..errors import CadsamError
from ..fast.runtime import Runtime, parse_setting
from ..methods import AdaptedSam, build_model
from . import flags


def settings(args: argparse.Namespace) -> dict:
    """``--set NAME=VALUE`` as a mapping."""
    return dict(parse_setting(text) for text in args.overrides or ())


def sorted_settings(
    args: argparse.Namespace, takes: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``--set`` of a command that builds a model but trains none (bench, plan), sorted as
    train sorts it: the model options, the runtime switches, and of train's other settings
    those in ``takes``, typed as train types them; any other is one line refusing it."""
    from ..config import setting_types, sort_settings, typed_value

    given = sort_settings(settings(args), "--set ")
    options, switches = given.pop("options", {}), given.pop("runtime", {})
    if "name" in switches:
        raise CadsamError("--set runtime: give --runtime NAME")
    refused = [name for name in given if name not in takes]
    if refused:
        taken = ["model options", "runtime switches", *takes]
        raise CadsamError(
            f"--set {', '.join(refused)}: {args.command} takes {', '.join(taken[:-1])} and "
            f"{taken[-1]}, not train's other settings"
        )
    hints = setting_types()
    return options, switches, {name: typed_value(name, v, hints[name]) for name, v in given.items()}


def runtime_from_flags(
    args: argparse.Namespace,
    device: torch.device,
    method: str | None = None,
    say: bool = True,
    job_images: int | None = None,
    precision: str | None = None,
) -> Runtime:
    """The runtime ``--runtime`` and ``--set`` ask for, checked for ``device`` and for the
    method that runs (by default the one --weights or --method names); said on stderr.
    ``job_images`` (images to process) and ``precision``: see :func:`~cadsam.api.runtime_for`."""
    given = settings(args)
    method = method or (method_of(args) if given else None)  # none: --weights is said next
    name = args.runtime_name or "auto"
    runtime, chosen = runtime_for(name, given, device, method, job_images, precision)
    if say:
        print(chosen, file=sys.stderr)
    return runtime


def method_of(args: argparse.Namespace) -> str | None:
    """The method the flags name: the one trained into --weights, or --method."""
    from ..weights import read_weights_metadata

    return read_weights_metadata(args.weights)["method"] if args.weights else args.method


def model_source_flags(parser: argparse.ArgumentParser) -> None:
    """What eval and export run: trained weights, or zero-shot SAM on any backbone."""
    source = parser.add_argument_group("the model (trained weights, or zero-shot SAM)")
    flags.add(source, "--weights")
    flags.add(source, "--method", choices=["zero-shot"])
    flags.add_all(source, "--backbone", "--checkpoint", "--random-weights")


def load_model_source(args: argparse.Namespace, runtime: Runtime | None) -> tuple[AdaptedSam, int]:
    """The model and its input size, from --weights or --method zero-shot --backbone."""
    from ..backbones import base_weights_note
    from ..weights import load_weights

    if args.weights:
        if args.method not in (None, "zero-shot") or args.backbone:
            raise CadsamError("--weights already says the method and backbone")
        model, meta = load_weights(args.weights, args.checkpoint, runtime)
        return model, args.image_size or meta["image_size"]
    if args.method != "zero-shot" or not args.backbone:
        raise CadsamError(
            "give --weights FILE, or --method zero-shot --backbone B [--checkpoint C]"
        )
    note = base_weights_note(args.backbone, args.checkpoint, bool(args.random_weights))
    if note:
        print(note, file=sys.stderr)
    model = build_model("zero-shot", args.backbone, args.checkpoint, runtime=runtime)
    return model, args.image_size or 512
