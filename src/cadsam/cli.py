"""The ``cadsam`` command. Each subcommand is a function taking the parsed arguments.

User mistakes raise :class:`CadsamError`; they are printed as one line and exit with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .backbones import BACKBONES, RELEASED_BACKBONES, TEST_BACKBONES
from .errors import CadsamError
from .methods import (
    METHOD_OPTIONS,
    METHODS,
    build_model,
    check_method_on_backbone,
    check_runtime_settings,
    runs_on,
)
from .precision import PRECISIONS
from .runtime import RUNTIMES, Runtime, parse_setting, resolve_runtime
from .sam import SAM_CONFIGS


def cmd_params(args: argparse.Namespace) -> None:
    backbones = args.backbone or RELEASED_BACKBONES
    for backbone in backbones:  # a method named where it does not run: an error, not a skip
        for method in args.method or ():
            check_method_on_backbone(method, backbone)
    rows = []
    for backbone in backbones:
        for method in args.method or [m for m in METHODS if runs_on(m, backbone)]:
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                counts = build_model(method, backbone).parameter_counts()
            rows.append({"method": method, "backbone": backbone, **counts})
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    elif len(rows) == 1:
        row = rows[0]
        print(
            f"{row['method']} on {row['backbone']}: {row['trainable']:,} trainable "
            f"of {row['total']:,} parameters"
        )
    else:
        wide = max(len("backbone"), *(len(row["backbone"]) for row in rows))
        print(f"{'backbone':<{wide}} {'method':<18} {'trainable':>12} {'total':>13}")
        for row in rows:
            print(
                f"{row['backbone']:<{wide}} {row['method']:<18} {row['trainable']:>12,} "
                f"{row['total']:>13,}"
            )


def cmd_train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    config = TrainConfig.from_sources(args.config, train_settings(args))
    train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"weights: {Path(config.out) / 'last.safetensors'}")


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, in TrainConfig's keys: each flag's ``dest`` is
    its key, and ``--set NAME=VALUE`` reaches the rest by name (model options, runtime
    settings, training settings without a flag). On --resume the run's own config decides."""
    from .train import TrainConfig

    skip = ("func", "command", "config", "overrides", "runtime_name")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    runtime = {"name": args.runtime_name} if args.runtime_name else {}
    options: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"options", "runtime"}
    model_options = {name for accepted in METHOD_OPTIONS.values() for name in accepted}
    runtime_fields = {f.name for f in dataclasses.fields(Runtime)}
    for name, value in (parse_setting(text) for text in args.overrides):
        if name in runtime_fields:
            runtime[name] = value
        elif name in model_options:
            options[name] = value
        elif name in fields:
            given[name] = value
        else:
            raise CadsamError(
                f"--set {name}: no such setting (model options: {', '.join(sorted(model_options))}; "
                "runtime settings and training settings: see cadsam train --help)"
            )
    if options:
        given["options"] = options
    if runtime:
        given["runtime"] = runtime
    return _resume_settings(args, given) if args.resume else given


def _resume_settings(args: argparse.Namespace, given: dict) -> dict:
    """On --resume the run's own config.yaml decides; settings that contradict it are errors."""
    from .train import RUNTIME_KEYS, _upgraded, load_yaml

    saved_path = Path(args.out) / "config.yaml"
    if not saved_path.is_file():
        raise CadsamError(f"nothing to resume in {args.out} (no config.yaml)")
    saved = _upgraded(load_yaml(saved_path))
    for key, value in given.items():
        if key == "options":
            value = {**saved.get("options", {}), **value}
        if key not in RUNTIME_KEYS and saved.get(key) != value:
            raise CadsamError(
                f"--{key.replace('_', '-')} {value} differs from the run's {saved.get(key)}"
            )
    if "runtime" in given:  # how to run may change; the run's own choice holds otherwise
        given = {**given, "runtime": {**saved.get("runtime", {}), **given["runtime"]}}
    return {**saved, **{k: v for k, v in given.items() if k in RUNTIME_KEYS}}


def _data_args(sub: argparse.ArgumentParser, default_split: str) -> None:
    data = sub.add_argument_group("data (a folder pair, or a named layout)")
    data.add_argument("--images", help="folder of images")
    data.add_argument("--masks", help="folder of masks, paired with the images by file stem")
    data.add_argument("--dataset", help="named layout: istd, camo, cod10k, sinet")
    data.add_argument("--data-root", help="root folder of the named layout")
    data.add_argument(
        "--split",
        default=None if default_split == "train" else default_split,
        help=f"split of the named layout (default: {default_split})",
    )
    data.add_argument(
        "--mask-threshold", type=int, help="8-bit mask values above it are foreground (default 127)"
    )
    data.add_argument(
        "--resize-masks",
        action="store_true",
        default=None,
        help="resize a mask whose size differs from its image's (default: an error)",
    )
    data.add_argument(
        "--mask-suffix",
        metavar="SUFFIX",
        help="masks are named <image stem>SUFFIX: --mask-suffix _mask pairs 00.png with "
        "00_mask.png",
    )
    data.add_argument(
        "--skip-bad",
        action="store_true",
        default=None,
        help="skip (and report) unpaired files and unreadable or mismatched pairs instead "
        "of stopping",
    )


def _runtime_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--runtime",
        dest="runtime_name",
        choices=list(RUNTIMES),
        default="auto",
        help="how to run (default auto: the fastest path that fits the device; plain: the "
        "reference path); never changes a result beyond rounding",
    )
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="NAME=VALUE",
        help="a runtime setting (repeatable; README 'Runtime')",
    )


def _runtime(args: argparse.Namespace, device: torch.device) -> Runtime:
    """The runtime --runtime and --set ask for, checked for ``device`` and for the method that
    runs (the one the weights were trained with); said on stderr."""
    from .weights import read_weights_metadata

    settings = dict(parse_setting(text) for text in args.overrides)
    if settings:
        method = read_weights_metadata(args.weights)["method"] if args.weights else args.method
        if method:  # none: the missing --weights is said next
            check_runtime_settings(method, settings)
    runtime, chosen = resolve_runtime(args.runtime_name, settings, device)
    print(chosen, file=sys.stderr)
    return runtime


def _load_eval_model(args: argparse.Namespace, runtime: Runtime):
    from .backbones import base_weights_note
    from .weights import load_weights

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


def cmd_eval(args: argparse.Namespace) -> None:
    from . import distributed
    from .data import SegmentationDataset, find_pairs, scan_pairs
    from .evaluate import constant_prediction_warning, evaluate, format_table

    dist = distributed.setup(args.device)
    try:
        model, size = _load_eval_model(args, _runtime(args, dist.device))
        model.for_inference()
        pairs = find_pairs(
            args.images,
            args.masks,
            args.dataset,
            args.data_root,
            args.split,
            skip_bad=bool(args.skip_bad),
            mask_suffix=args.mask_suffix,
        )
        threshold = 127 if args.mask_threshold is None else args.mask_threshold
        pairs, bad = scan_pairs(
            pairs, threshold, bool(args.resize_masks), bool(args.skip_bad), progress=dist.is_main
        )
        dataset = SegmentationDataset(
            pairs,
            size,
            mask_threshold=threshold,
            resize_masks=bool(args.resize_masks),
            keep_original=args.eval_resolution == "original",
        )
        metrics = evaluate(
            model.to(dist.device),
            dataset,
            batch_size=args.batch_size,
            dist=dist,
            precision=args.precision,
            resolution=args.eval_resolution,
            sod=args.sod,
            num_workers=args.num_workers,
        )
        if bad:
            metrics["skipped"] = len(bad)
        if dist.is_main:
            print(json.dumps(metrics) if args.json else format_table(metrics))
            warning = constant_prediction_warning(metrics)
            if warning:
                print(f"cadsam: {warning}", file=sys.stderr)
    finally:
        distributed.teardown(dist)


def cmd_predict(args: argparse.Namespace) -> None:
    from .distributed import pick_device
    from .predict import input_files, predict
    from .weights import load_weights

    if args.onnx:
        device, inputs = torch.device("cpu"), input_files(args.input)
        model, size = _onnx_model(args)
    else:
        if not args.weights:
            raise CadsamError("give --weights FILE (or --onnx FILE.onnx, from cadsam export)")
        device = pick_device(args.device)
        inputs = input_files(args.input)
        model, meta = load_weights(args.weights, args.checkpoint, _runtime(args, device))
        model.for_inference()
        size = meta["image_size"]
    written = predict(
        model,
        inputs,
        args.output,
        size,
        device,
        args.precision,
        args.probabilities,
        args.overlay,
        skip_bad=args.skip_bad,
    )
    skipped = len(inputs) - len(written)
    note = f"; skipped {skipped} unreadable input(s)" if skipped else ""
    print(f"wrote {len(written)} mask(s) to {args.output}{note}")


def _onnx_model(args: argparse.Namespace) -> tuple[Any, int]:
    """predict --onnx: an exported graph run by onnxruntime, behind the model interface."""
    from .export import OnnxModel

    flags = (
        ("--weights", args.weights),
        ("--checkpoint", args.checkpoint),
        ("--set", args.overrides),
    )
    given = [flag for flag, value in flags if value]
    if given:
        raise CadsamError(f"--onnx runs an exported graph: {', '.join(given)} does not apply")
    if args.precision != "fp32":
        raise CadsamError("--precision is for PyTorch models; export --half writes a float16 graph")
    model = OnnxModel(args.onnx, args.device)
    return model, model.image_size


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_onnx

    model, size = _load_eval_model(args, None)
    print(f"exporting {model.method} on {model.backbone}, {size} x {size} images", file=sys.stderr)
    report = export_onnx(
        model, size, args.out, args.split, args.half, args.opset, args.sample, progress=_stage
    )
    for path in report.files:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(
        f"onnxruntime vs PyTorch on {report.samples} {report.sample_source} image(s): largest "
        f"difference {report.difference:.1e} of the logits' scale (limit {report.limit:.0e})"
    )


def _stage(stage: str) -> None:
    print(f"  {stage}...", file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench

    overrides = dict(parse_setting(text) for text in args.overrides)
    run_bench(
        args.backbones,
        args.variants,
        args.precision,
        Path(args.out),
        args.steps,
        overrides=overrides,
    )
    print(f"wrote {args.out}/bench.json, bench.md, bench_memory.png")


def cmd_cache(args: argparse.Namespace) -> None:
    from .cache import build_cache
    from .data import layout_pairs
    from .data.io import list_images

    if args.dataset:
        if args.images or not args.data_root:
            raise CadsamError("give --images DIR, or --dataset LAYOUT --data-root DIR")
        images = [p.image for p in layout_pairs(args.dataset, args.data_root, args.split)]
    elif args.images:
        images = list_images(args.images)
        if not images:
            raise CadsamError(f"no images found in {args.images}")
    else:
        raise CadsamError("give --images DIR, or --dataset LAYOUT --data-root DIR")
    cache = build_cache(
        images,
        args.out,
        args.backbone,
        args.checkpoint,
        args.views,
        args.image_size,
        args.batch_size,
        args.precision,
        args.dtype,
        args.device,
        args.compile,
        args.num_workers,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cache: {args.out} ({len(cache.done)} embeddings, complete: {cache.complete()})")
        print(f"cache: {cache.describe_entry()}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(
        args.out,
        args.checkpoint,
        args.train_images,
        args.test_images,
        args.image_size,
        args.epochs,
        progress=not args.no_progress,
        backbone=args.backbone,
    )


def cmd_reproduce(args: argparse.Namespace) -> None:
    from .reproduce import reproduce

    report = reproduce(
        args.data_root,
        args.checkpoint_dir,
        args.out,
        args.datasets,
        args.backbones,
        args.methods,
        args.epochs,
        args.image_size,
        args.adapter_size,
        args.device,
        args.num_workers,
        not args.no_progress,
    )
    print(f"report: {report}")


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    """``cadsam train``'s flags: what a user decides. Each flag's ``dest`` is its TrainConfig
    key; everything else is reached by ``--set NAME=VALUE`` (listed in the epilogue)."""
    train.add_argument("--config", help="YAML file of settings (command-line flags override it)")
    train.add_argument("--method", choices=[m for m in METHODS if m != "zero-shot"])
    train.add_argument("--backbone", choices=list(BACKBONES))
    train.add_argument(
        "--checkpoint",
        help="SAM checkpoint: Meta's .pth/.pt, a Hugging Face SamModel file or folder "
        "(model.safetensors, pytorch_model.bin), or vit_b / vit_l / vit_h / sam2.1_hiera_t / "
        "_s / _b+ / _l (downloaded if absent)",
    )
    train.add_argument(
        "--random-weights",
        action="store_true",
        default=None,
        help="train on randomly initialised SAM on purpose (no --checkpoint)",
    )
    train.add_argument("--out", help="run directory")
    _data_args(train, "train")
    val = train.add_argument_group(
        "validation (optional; the best epoch is kept as best.safetensors)"
    )
    val.add_argument(
        "--val-fraction", type=float, help="hold out this fraction of the training pairs"
    )
    val.add_argument("--val-images", help="validation images folder")
    val.add_argument("--val-masks", help="validation masks folder")
    opt = train.add_argument_group("optimisation (defaults: the paper's)")
    opt.add_argument("--epochs", type=int, help="default 20")
    opt.add_argument(
        "--batch-size", type=int, help="per process; default 4 (2 for vit_h and sam2.1_hiera_l)"
    )
    opt.add_argument("--lr", type=float, help="default 2e-4 (AdamW)")
    opt.add_argument("--image-size", type=int, help="training resolution (default 512)")
    opt.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=None,
        help="resize only, no flips or rotations",
    )
    opt.add_argument(
        "--precision", choices=list(PRECISIONS), help="fp32 (default) or bf16 autocast"
    )
    run = train.add_argument_group("running")
    run.add_argument(
        "--cache", help="train from this embedding cache (cadsam cache): no image encoder in memory"
    )
    run.add_argument(
        "--resume", action="store_true", default=None, help="continue the run in --out"
    )
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument(
        "--runtime",
        dest="runtime_name",
        choices=list(RUNTIMES),
        help="how to run, never what is trained: auto (default: the fastest path that fits "
        "the device), lean (the least memory) or plain (the reference path)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="NAME=VALUE",
        help="any other setting, by name (repeatable): see below",
    )
    run.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no bars"
    )
    train.epilog = _set_epilog()
    train.formatter_class = argparse.RawDescriptionHelpFormatter


def _model_source_args(parser: argparse.ArgumentParser) -> None:
    """What eval and export run: trained weights, or zero-shot SAM on any backbone (read by
    ``_load_eval_model``)."""
    parser.add_argument(
        "--weights", help="a weights file written by cadsam train, or its run folder"
    )
    parser.add_argument(
        "--method", choices=["zero-shot"], help="zero-shot: plain SAM with a whole-image box"
    )
    parser.add_argument("--backbone", choices=list(BACKBONES), help="with --method zero-shot")
    parser.add_argument(
        "--checkpoint",
        help="SAM checkpoint for zero-shot (Meta's, Hugging Face's, or a name, as train "
        "takes it), or where the weights' base checkpoint now is",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="zero-shot on randomly initialised SAM, on purpose (no --checkpoint)",
    )


def add_export_arguments(ex: argparse.ArgumentParser) -> None:
    _model_source_args(ex)
    ex.add_argument(
        "--image-size",
        type=int,
        help="the graph's image size S (default: the weights' training size, or 512)",
    )
    ex.add_argument(
        "--out",
        required=True,
        metavar="FILE.onnx",
        help="the graph (with --split: FILE.encoder.onnx and FILE.decoder.onnx)",
    )
    ex.add_argument(
        "--split",
        action="store_true",
        help="two graphs, as SAM's ONNX demo: images -> embeddings, and images + embeddings "
        "-> logits",
    )
    ex.add_argument(
        "--half",
        action="store_true",
        help="a float16 graph (float32 inputs and outputs), checked to 5e-2 of the logits' "
        "scale instead of 1e-3",
    )
    from .export import DEFAULT_OPSET  # (the module reads onnx only when it exports)

    ex.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}, the lowest torch's exporter writes)",
    )
    ex.add_argument(
        "--sample", help="a folder of images to check the graph on (default: 2 random images)"
    )


# TrainConfig's settings that no flag of train sets: --set NAME=VALUE or a --config file's key
SET_ONLY_TRAINING = (
    "grad_accum",
    "weight_decay",
    "schedule",
    "seed",
    "num_workers",
    "tensorboard",
)


def _set_epilog() -> str:
    from .train import SCHEDULES, TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    shown = {**defaults, "schedule": "|".join(SCHEDULES)}
    training = ", ".join(f"{name} ({str(shown[name]).lower()})" for name in SET_ONLY_TRAINING)
    runtime = ", ".join(f.name for f in dataclasses.fields(Runtime))
    options = "; ".join(
        f"{method}: {', '.join(f'{k} (default {v})' for k, v in accepted.items())}"
        for method, accepted in METHOD_OPTIONS.items()
        if accepted
    )
    return (
        "--set NAME=VALUE reaches every other setting (also a key of a --config file):\n"
        f"  model options (saved with the weights): {options}\n"
        f"  training: {training}\n"
        f"  runtime (speed and memory only; README 'Runtime'): {runtime}\n"
        "e.g. --set adapter_size=256 --set schedule=constant --set cuda_graph=true"
    )


def add_params_arguments(params: argparse.ArgumentParser) -> None:
    params.add_argument(
        "--backbone",
        nargs="+",
        choices=list(BACKBONES),
        metavar="BACKBONE",
        help=f"any of: {', '.join(BACKBONES)} (default: every one Meta released weights for)",
    )
    params.add_argument(
        "--method",
        nargs="+",
        choices=list(METHODS),
        metavar="METHOD",
        help=f"any of: {', '.join(METHODS)} (default: every one that runs on the backbone)",
    )
    params.add_argument(
        "--json", action="store_true", help="one JSON object per backbone and method, a line each"
    )


def add_eval_arguments(ev: argparse.ArgumentParser) -> None:
    _model_source_args(ev)
    _data_args(ev, "test")
    ev.add_argument(
        "--eval-resolution",
        choices=["train", "original"],
        default="train",
        help="score at the training size (the paper's) or each ground truth's own size",
    )
    ev.add_argument(
        "--image-size",
        type=int,
        help="model input size (default: the weights' training size, or 512)",
    )
    ev.add_argument(
        "--sod",
        action="store_true",
        help="also S-measure, E-measure, weighted F (needs cadsam[sod])",
    )
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    ev.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ev.add_argument("--num-workers", type=int, default=2)
    _runtime_args(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")


def add_predict_arguments(pr: argparse.ArgumentParser) -> None:
    pr.add_argument("--weights", help="a weights file written by cadsam train, or its run folder")
    pr.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="instead of --weights: a graph written by cadsam export, run by onnxruntime "
        "(pip install 'cadsam[onnx]')",
    )
    pr.add_argument("--input", required=True, help="an image or a folder of images")
    pr.add_argument("--output", required=True, help="folder for <name>.png masks (0/255)")
    pr.add_argument(
        "--checkpoint", help="where the weights' base SAM checkpoint now is, if it moved"
    )
    pr.add_argument(
        "--probabilities",
        action="store_true",
        help="also write <name>_prob.png (8-bit probability)",
    )
    pr.add_argument(
        "--overlay", action="store_true", help="also write <name>_overlay.png (mask over the image)"
    )
    pr.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    pr.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _runtime_args(pr)
    pr.add_argument(
        "--skip-bad",
        action="store_true",
        help="exit 0 even if some inputs cannot be read (they are still reported)",
    )


def add_cache_arguments(ca: argparse.ArgumentParser) -> None:
    from .data.transforms import VIEWS

    ca.add_argument("--backbone", required=True, choices=list(BACKBONES))
    ca.add_argument(
        "--checkpoint",
        help="SAM checkpoint: Meta's .pth/.pt, a Hugging Face SamModel file or folder, or "
        "vit_b / vit_l / vit_h / sam2.1_hiera_t / ...",
    )
    ca.add_argument("--images", help="folder of images")
    ca.add_argument("--dataset", help="named layout: istd, camo, cod10k, sinet")
    ca.add_argument("--data-root", help="root folder of the named layout")
    ca.add_argument("--split", default="train", help="split of the named layout (default: train)")
    ca.add_argument(
        "--out", required=True, help="cache folder (rerun the same command to finish it)"
    )
    ca.add_argument(
        "--views",
        nargs="+",
        default=["identity"],
        metavar="VIEW",
        help=f"views to store per image, any of: {', '.join(VIEWS)} (default: identity)",
    )
    ca.add_argument(
        "--image-size", type=int, default=512, help="the training resolution (default 512)"
    )
    ca.add_argument("--batch-size", type=int, default=8)
    ca.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="bf16",
        help="encoder precision (default bf16)",
    )
    ca.add_argument(
        "--dtype", choices=["float16", "float32"], default="float16", help="stored precision"
    )
    ca.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder (faster for large sets)"
    )
    ca.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ca.add_argument("--num-workers", type=int, default=4)


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", default="cadsam-demo", help="folder for data, runs and report.md")
    demo.add_argument(
        "--checkpoint", help="a SAM or SAM 2.1 checkpoint to use instead of random vit_tiny"
    )
    demo.add_argument(
        "--backbone",
        choices=TEST_BACKBONES,
        help="without --checkpoint: the small configuration to run on random weights "
        "(default vit_tiny, unless a Meta SAM checkpoint is in the cache)",
    )
    demo.add_argument("--train-images", type=int, default=48)
    demo.add_argument("--test-images", type=int, default=16)
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--no-progress", action="store_true")


def add_reproduce_arguments(rep: argparse.ArgumentParser) -> None:
    from .reproduce import DATASETS
    from .reproduce import METHODS as PAPER_METHODS

    rep.add_argument(
        "--data-root",
        required=True,
        help="folder holding ISTD/, CAMO/, COD10K/ in their standard layouts",
    )
    rep.add_argument(
        "--checkpoint-dir", required=True, help="folder holding Meta's sam_vit_*.pth files"
    )
    rep.add_argument(
        "--out", required=True, help="folder for runs, tables.md, tables.csv and figures"
    )
    rep.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    rep.add_argument(
        "--backbones", nargs="+", default=["vit_b", "vit_h"], choices=list(SAM_CONFIGS)
    )
    rep.add_argument(
        "--methods", nargs="+", default=list(PAPER_METHODS), choices=list(PAPER_METHODS)
    )
    rep.add_argument("--epochs", type=int, default=20)
    rep.add_argument("--image-size", type=int, default=512)
    rep.add_argument("--adapter-size", type=int, help="cad's adapter input (default 512)")
    rep.add_argument("--device")
    rep.add_argument("--num-workers", type=int, default=2)
    rep.add_argument("--no-progress", action="store_true")


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(bench)


# name -> (what runs it, what it takes, its one-line help)
COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "params": (
        cmd_params,
        add_params_arguments,
        "Count methods' trainable and total parameters, per backbone.",
    ),
    "train": (
        cmd_train,
        add_train_arguments,
        "Train a method on a data set; writes weights, config and metrics into --out.",
    ),
    "eval": (
        cmd_eval,
        add_eval_arguments,
        "Score trained weights (or zero-shot SAM) on a data set: Dice, IoU, MAE, BER ...",
    ),
    "predict": (
        cmd_predict,
        add_predict_arguments,
        "Write a trained model's masks for images, at each image's own size.",
    ),
    "export": (
        cmd_export,
        add_export_arguments,
        "Export trained weights (or zero-shot SAM) to ONNX: one graph from RGB images to "
        "mask logits, checked against PyTorch with onnxruntime (pip install 'cadsam[onnx]').",
    ),
    "cache": (
        cmd_cache,
        add_cache_arguments,
        "Run the frozen encoder once per image and store the embeddings for training.",
    ),
    "demo": (
        cmd_demo,
        add_demo_arguments,
        "Train and compare decoder-only, SAM-Adapter, LoRA and CAD on a synthetic set, on a CPU, "
        "with nothing to download; writes a report with the paper-scale memory beside them.",
    ),
    "reproduce": (
        cmd_reproduce,
        add_reproduce_arguments,
        "Rerun the paper's experiments (Tables 1-4, Figures 6-8); "
        "rerun to continue after an interruption.",
    ),
    "bench": (
        cmd_bench,
        add_bench_arguments,
        "Measure peak GPU memory and training speed per method (needs a CUDA GPU).",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadsam",
        description="Adapt Segment Anything to a new segmentation domain with CAD, the "
        "parallel convolutional adapter, or one of its baselines.",
    )
    parser.add_argument("--version", action="version", version=f"cadsam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, add_arguments, help) in COMMANDS.items():
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(func=func)
        add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CadsamError as exc:
        print(f"cadsam: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cadsam: interrupted", file=sys.stderr)
        return 130
    return 0
