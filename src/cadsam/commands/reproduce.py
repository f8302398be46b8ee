"""``cadsam reproduce``: the paper's experiments (Tables 1-4, Figures 6-8) in one command."""

from __future__ import annotations

import argparse

from . import common, flags

HELP = (
    "Rerun the paper's experiments (Tables 1-4, Figures 6-8); rerun to continue after an "
    "interruption."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..reproduce import DATASETS
    from ..reproduce import METHODS as PAPER_METHODS
    from ..sam import SAM_CONFIGS

    flags.add(parser, "--data-root", required=True)
    parser.add_argument(
        "--checkpoint-dir", required=True, help="folder holding Meta's sam_vit_*.pth files"
    )
    flags.add(parser, "--out", required=True, metavar="DIR")
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=list(DATASETS),
        metavar="DATASET",
        help=f"any of: {', '.join(DATASETS)} (default: all)",
    )
    flags.add(parser, "--backbones", choices=list(SAM_CONFIGS))
    flags.add(parser, "--methods", choices=list(PAPER_METHODS))
    flags.add_all(parser, "--epochs", "--image-size", "--num-workers")
    parser.add_argument("--adapter-size", type=int, help="cad's adapter input (default 512)")
    flags.running_flags(parser)
    parser.epilog = "defaults: every data set, vit_b and vit_h, every method of the paper and LoRA"


def run(args: argparse.Namespace) -> None:
    from ..reproduce import reproduce

    report = reproduce(
        args.data_root,
        args.checkpoint_dir,
        args.out,
        args.datasets,
        args.backbones or ["vit_b", "vit_h"],
        args.methods,
        args.epochs or 20,
        args.image_size or 512,
        args.adapter_size,
        args.device,
        args.num_workers,
        args.progress is not False,
        runtime={"name": args.runtime_name or "auto", **common.settings(args)},
        precision=args.precision or "fp32",
    )
    print(f"report: {report}")
