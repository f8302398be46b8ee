"""``cadsam demo``: the whole workflow at toy scale, on a CPU, with nothing to download."""

from __future__ import annotations

import argparse

from ..backbones import TEST_BACKBONES
from . import common, flags

HELP = (
    "Train and compare decoder-only, SAM-Adapter, LoRA and CAD on a synthetic set, on a CPU, "
    "with nothing to download; writes a report with the paper-scale memory beside them."
)
DEMO_OUT = "cadsam-demo"
DEMO_EPOCHS = 10
DEMO_IMAGE_SIZE = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add(parser, "--out", metavar="DIR")
    flags.add(parser, "--checkpoint")
    flags.add(parser, "--backbone", choices=TEST_BACKBONES)
    parser.add_argument("--train-images", type=int, default=48, help="synthetic training images")
    parser.add_argument("--test-images", type=int, default=16, help="held-out images")
    flags.add_all(parser, "--image-size", "--epochs")
    flags.running_flags(parser)
    parser.epilog = (
        f"--out defaults to {DEMO_OUT}. Without --checkpoint the demo runs --backbone (default "
        "vit_tiny, unless one of Meta's SAM checkpoints is in the checkpoint cache) on random "
        "weights, saved under --out. Rerun it to reuse what is done."
    )


def run(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    run_demo(
        args.out or DEMO_OUT,
        args.checkpoint,
        args.train_images,
        args.test_images,
        args.image_size or DEMO_IMAGE_SIZE,
        args.epochs or DEMO_EPOCHS,
        progress=args.progress is not False,
        backbone=args.backbone,
        runtime={"name": args.runtime_name or "auto", **common.settings(args)},
        device=args.device,
        precision=args.precision or "fp32",
    )
