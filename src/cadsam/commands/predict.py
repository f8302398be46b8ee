"""``cadsam predict``: a trained model's masks for new images, at each image's own size."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..errors import CadsamError
from . import common, flags

HELP = "Write a trained model's masks for images, at each image's own size."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add(parser, "--weights")
    parser.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="instead of --weights: a graph written by cadsam export, run by onnxruntime "
        "(pip install 'cadsam[onnx]')",
    )
    flags.add_all(parser, "--checkpoint", "--images")
    flags.add(parser, "--out", metavar="DIR|MASK.png")
    flags.renamed(parser, "--input", "--images", dest="images")
    flags.renamed(parser, "--output", "--out", dest="out")
    written = parser.add_argument_group("what is written beside <name>.png (0/255)")
    written.add_argument(
        "--probabilities",
        action="store_true",
        help="also <name>_prob.png (8-bit probability)",
    )
    written.add_argument(
        "--overlay", action="store_true", help="also <name>_overlay.png (mask over the image)"
    )
    prompt = parser.add_argument_group(
        "the object to segment (default: the whole image, as the paper prompts)"
    )
    prompt.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box, in the image's pixels")
    prompt.add_argument(
        "--point",
        action="append",
        metavar="X,Y[,LABEL]",
        help="a point, in the image's pixels, label 1 (on the object, default) or 0; repeatable",
    )
    prompt.add_argument(
        "--prompts",
        metavar="FILE.json",
        help='each image\'s prompt: {"name.png": {"box": [x0, y0, x1, y1], "points": [[x, y, 1]]}}',
    )
    flags.add(parser, "--skip-bad")
    flags.running_flags(parser)
    parser.epilog = (
        "--out is a folder of <name>.png masks; for one input image it may be the mask's own "
        "file name (--out mask.png). Inputs that cannot be read are named; the other masks are "
        "written, and the command fails unless --skip-bad."
    )


def run(args: argparse.Namespace) -> None:
    from ..distributed import pick_device
    from ..prediction import input_files, mask_targets, predict, read_prompts
    from ..weights import load_weights

    for flag, value in (("--images", args.images), ("--out", args.out)):
        if value is None:
            raise CadsamError(f"{flag} is required")
    inputs = input_files(args.images)
    asked = (("prob", args.probabilities), ("overlay", args.overlay))
    siblings = tuple(kind for kind, given in asked if given)
    targets = mask_targets(args.out, inputs, "--out", siblings)  # before the model loads
    prompts = read_prompts(args.box, args.point, args.prompts, inputs)
    if prompts is not None and args.onnx:
        raise CadsamError(
            "--onnx runs the whole-image prompt's graph: drop --box/--point/--prompts"
        )
    if args.onnx:
        device = torch.device("cpu")
        model, size = _onnx_model(args)
    else:
        if not args.weights:
            raise CadsamError("give --weights FILE (or --onnx FILE.onnx, from cadsam export)")
        device = pick_device(args.device)
        # the precision and the images to process settle auto's frozen_bf16 and compilation
        precision = args.precision or "fp32"
        runtime = common.runtime_from_flags(
            args, device, job_images=len(inputs), precision=precision
        )
        model, meta = load_weights(args.weights, args.checkpoint, runtime)
        model.for_inference()
        size = meta["image_size"]
    written = predict(
        model,
        inputs,
        targets,
        size,
        device,
        args.precision or "fp32",
        bool(args.probabilities),
        bool(args.overlay),
        skip_bad=bool(args.skip_bad),
        progress=args.progress is not False,
        prompts=prompts,
    )
    skipped = len(inputs) - len(written)
    note = f"; skipped {skipped} unreadable input(s)" if skipped else ""
    print(f"wrote {len(written)} mask(s) to {args.out}{note}")


def _onnx_model(args: argparse.Namespace) -> tuple[Any, int]:
    """predict --onnx: an exported graph run by onnxruntime, behind the model interface."""
    from ..export import OnnxModel

    given = [
        flag
        for flag, value in (
            ("--weights", args.weights),
            ("--checkpoint", args.checkpoint),
            ("--set", args.overrides),
            ("--runtime", args.runtime_name),
        )
        if value
    ]
    if given:
        raise CadsamError(f"--onnx runs an exported graph: {', '.join(given)} does not apply")
    if args.precision not in (None, "fp32"):
        raise CadsamError("--precision is for PyTorch models; export --half writes a float16 graph")
    model = OnnxModel(args.onnx, args.device)
    return model, model.image_size
