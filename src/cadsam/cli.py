"""The ``cadsam`` command. Each subcommand is a function taking the parsed arguments.

User mistakes raise :class:`CadsamError`; they are printed as one line and exit with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import CadsamError
from .methods import METHOD_OPTIONS, METHODS, build_model
from .precision import PRECISIONS
from .sam import SAM_CONFIGS

METHOD_OPTION_FLAGS = (
    "adapter_size",
    "cad_layout",
    "checkpoint_blocks",
    "checkpoint_adapter",
    "adapter_tile_mib",
    "compile_tiles",
    "triton_kernels",
    "compile_blocks",
    "compile_decoder",
    "encoder_chunk",
)


def _auto_or_bool(text: str) -> str | bool:
    choices = {"auto": "auto", "true": True, "false": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"choose auto, true or false, not {text!r}")
    return choices[text.lower()]


def cmd_params(args: argparse.Namespace) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(args.method, args.backbone)
    counts = model.parameter_counts()
    if args.json:
        print(json.dumps({"method": args.method, "backbone": args.backbone, **counts}))
    else:
        print(
            f"{args.method} on {args.backbone}: {counts['trainable']:,} trainable "
            f"of {counts['total']:,} parameters"
        )


def cmd_train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("func", "command", "config")
    }
    options = {k: given.pop(k) for k in METHOD_OPTION_FLAGS if k in given}
    if options:
        given["method_options"] = options
    if given.pop("no_augment", False):
        given["augment"] = False
    if given.pop("no_progress", False):
        given["progress"] = False
    if args.resume:
        given = _resume_settings(args, given)
    config = TrainConfig.from_sources(args.config, given)
    train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"weights: {Path(config.out) / 'last.safetensors'}")


def _resume_settings(args: argparse.Namespace, given: dict) -> dict:
    """On --resume the run's own config.yaml decides; flags that contradict it are errors."""
    from .train import RUNTIME_KEYS, load_yaml

    saved_path = Path(args.out) / "config.yaml"
    if not saved_path.is_file():
        raise CadsamError(f"nothing to resume in {args.out} (no config.yaml)")
    saved = load_yaml(saved_path)
    for key, value in given.items():
        if key not in RUNTIME_KEYS and saved.get(key) != value:
            raise CadsamError(
                f"--{key.replace('_', '-')} {value} differs from the run's {saved.get(key)}"
            )
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
        "--skip-bad",
        action="store_true",
        default=None,
        help="skip unreadable or mismatched pairs instead of stopping",
    )


def _load_eval_model(args: argparse.Namespace):
    from .weights import load_weights

    if args.weights:
        if args.method not in (None, "zero-shot") or args.backbone:
            raise CadsamError("--weights already says the method and backbone")
        model, meta = load_weights(args.weights, args.checkpoint)
        return model, args.image_size or meta["image_size"]
    if args.method != "zero-shot" or not args.backbone:
        raise CadsamError(
            "give --weights FILE, or --method zero-shot --backbone B [--checkpoint C]"
        )
    return build_model("zero-shot", args.backbone, args.checkpoint), args.image_size or 512


def cmd_eval(args: argparse.Namespace) -> None:
    from . import distributed
    from .data import SegmentationDataset, find_pairs, scan_pairs
    from .evaluate import evaluate, format_table

    dist = distributed.setup(args.device)
    try:
        model, size = _load_eval_model(args)
        pairs = find_pairs(args.images, args.masks, args.dataset, args.data_root, args.split)
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
    finally:
        distributed.teardown(dist)


def cmd_predict(args: argparse.Namespace) -> None:
    from .distributed import pick_device
    from .predict import input_files, predict
    from .weights import load_weights

    inputs = input_files(args.input)
    model, meta = load_weights(args.weights, args.checkpoint)
    written = predict(
        model,
        inputs,
        args.output,
        meta["image_size"],
        pick_device(args.device),
        args.precision,
        args.probabilities,
        args.overlay,
    )
    print(f"wrote {len(written)} mask(s) to {args.output}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import parse_setting, run_bench

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadsam",
        description="Adapt Segment Anything to a new segmentation domain with CAD, the "
        "parallel convolutional adapter, or one of its baselines.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], None], help: str):
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    params = command("params", cmd_params, "Count a method's trainable and total parameters.")
    params.add_argument("--backbone", required=True, choices=list(SAM_CONFIGS))
    params.add_argument("--method", required=True, choices=list(METHODS))
    params.add_argument("--json", action="store_true", help="print one JSON object")

    train = command(
        "train",
        cmd_train,
        "Train a method on a data set; writes weights, config and metrics into --out.",
    )
    train.add_argument("--config", help="YAML file of settings (command-line flags override it)")
    train.add_argument("--method", choices=[m for m in METHODS if m != "zero-shot"])
    train.add_argument("--backbone", choices=list(SAM_CONFIGS))
    train.add_argument(
        "--checkpoint",
        help="SAM checkpoint: a .pth path or vit_b / vit_l / vit_h (downloaded if absent)",
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
    opt.add_argument("--batch-size", type=int, help="per process; default 4 (2 for vit_h)")
    opt.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step (default 1)")
    opt.add_argument("--lr", type=float, help="default 2e-4 (AdamW)")
    opt.add_argument("--weight-decay", type=float, help="default 0.01")
    opt.add_argument(
        "--schedule",
        choices=["cosine", "constant"],
        help="per-step cosine (default) or constant, which reproduces the authors' effective schedule",
    )
    opt.add_argument("--seed", type=int, help="default 21")
    opt.add_argument(
        "--precision", choices=list(PRECISIONS), help="fp32 (default) or bf16 autocast"
    )
    opt.add_argument("--image-size", type=int, help="training resolution (default 512)")
    opt.add_argument(
        "--no-augment", action="store_true", default=None, help="resize only, no flips or rotations"
    )
    meth = train.add_argument_group("method options")
    meth.add_argument(
        "--adapter-size", type=int, help="cad: the adapter's input resolution (default 512)"
    )
    meth.add_argument(
        "--cad-layout", choices=["official", "paper"], help="cad: block layout (default official)"
    )
    meth.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        default=None,
        help="sam-adapter*: recompute each encoder block in backward to save memory",
    )
    meth.add_argument(
        "--checkpoint-adapter",
        action="store_true",
        default=None,
        help="cad: recompute each adapter block that runs whole in backward to save memory",
    )
    meth.add_argument(
        "--adapter-tile-mib",
        type=float,
        help="cad: run an adapter block band by band when its activation exceeds this many MiB "
        f"(default {METHOD_OPTIONS['cad']['adapter_tile_mib']:g}; 0: never), keeping only its "
        "input: the same values, far less memory",
    )
    meth.add_argument(
        "--compile-tiles",
        type=_auto_or_bool,
        metavar="{auto,true,false}",
        help="cad: fuse the banded blocks' elementwise arithmetic with torch.compile "
        "(default auto: on CUDA; false skips the compilation's warm-up)",
    )
    meth.add_argument(
        "--triton-kernels",
        type=_auto_or_bool,
        metavar="{auto,true,false}",
        help="cad: run the banded first block as Triton kernels that never write its "
        "256-channel activation (default auto: on CUDA where Triton imports)",
    )
    meth.add_argument(
        "--compile-blocks",
        type=_auto_or_bool,
        metavar="{auto,true,false}",
        help="cad: the adapter blocks that run whole through torch.compile, which fuses their "
        "elementwise arithmetic (default auto: while training on CUDA without "
        "--checkpoint-adapter, with which it does not combine)",
    )
    meth.add_argument(
        "--compile-decoder",
        type=_auto_or_bool,
        metavar="{auto,true,false}",
        help="the mask decoder through torch.compile, which fuses its many small kernels "
        "(default auto: while training on CUDA; false skips the compilation's warm-up)",
    )
    meth.add_argument(
        "--encoder-chunk",
        type=int,
        help="images per frozen-encoder call (default 1; 0: the whole batch, faster, more memory)",
    )
    train.add_argument(
        "--cache", help="train from this embedding cache (cadsam cache): no image encoder in memory"
    )
    run = train.add_argument_group("running")
    run.add_argument(
        "--resume", action="store_true", default=None, help="continue the run in --out"
    )
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument("--num-workers", type=int, help="data loading processes (default 2)")
    run.add_argument("--no-progress", action="store_true", default=None, help="no progress bars")
    run.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the training step as a CUDA graph after 3 eager steps and replay it: "
        "the same arithmetic, launched at once (one GPU, no --grad-accum; a short last "
        "batch runs eagerly). Speeds up steps bound by kernel launches, such as from --cache. "
        "On --resume the run's own choice holds unless given",
    )
    run.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also log loss, learning rate and validation to RUN/tensorboard",
    )

    ev = command(
        "eval",
        cmd_eval,
        "Score trained weights (or zero-shot SAM) on a data set: Dice, IoU, MAE, BER ...",
    )
    ev.add_argument("--weights", help="a weights file written by cadsam train")
    ev.add_argument(
        "--method", choices=["zero-shot"], help="zero-shot: plain SAM with a whole-image box"
    )
    ev.add_argument("--backbone", choices=list(SAM_CONFIGS), help="with --method zero-shot")
    ev.add_argument(
        "--checkpoint",
        help="SAM checkpoint (zero-shot), or where the weights' base checkpoint now is",
    )
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
    ev.add_argument("--device")
    ev.add_argument("--num-workers", type=int, default=2)
    ev.add_argument("--json", action="store_true", help="print one JSON object")

    pr = command(
        "predict",
        cmd_predict,
        "Write a trained model's masks for images, at each image's own size.",
    )
    pr.add_argument("--weights", required=True, help="a weights file written by cadsam train")
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
    pr.add_argument("--device")

    from .data.transforms import VIEWS

    ca = command(
        "cache",
        cmd_cache,
        "Run the frozen encoder once per image and store the embeddings for training.",
    )
    ca.add_argument("--backbone", required=True, choices=list(SAM_CONFIGS))
    ca.add_argument("--checkpoint", help="SAM checkpoint: a .pth path or vit_b / vit_l / vit_h")
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
    ca.add_argument("--device")
    ca.add_argument("--num-workers", type=int, default=4)

    demo = command(
        "demo",
        cmd_demo,
        "Train and compare decoder and CAD on a synthetic set, on a CPU, "
        "with nothing to download; writes a report.",
    )
    demo.add_argument("--out", default="cadsam-demo", help="folder for data, runs and report.md")
    demo.add_argument(
        "--checkpoint", help="a real SAM checkpoint to use instead of random vit_tiny"
    )
    demo.add_argument("--train-images", type=int, default=48)
    demo.add_argument("--test-images", type=int, default=16)
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--no-progress", action="store_true")

    from .reproduce import DATASETS
    from .reproduce import METHODS as PAPER_METHODS

    rep = command(
        "reproduce",
        cmd_reproduce,
        "Rerun the paper's experiments (Tables 1-4, Figures 6-8); "
        "rerun to continue after an interruption.",
    )
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
    rep.add_argument("--adapter-size", type=int, default=512)
    rep.add_argument("--device")
    rep.add_argument("--num-workers", type=int, default=2)
    rep.add_argument("--no-progress", action="store_true")

    from .bench import add_arguments

    bench = command(
        "bench",
        cmd_bench,
        "Measure peak GPU memory and training speed per method (needs a CUDA GPU).",
    )
    add_arguments(bench)
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
