"""``cadsam eval``: the paper's Dice and IoU and the field's metrics, of trained weights or of
zero-shot SAM, on a folder pair or a named layout."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..cores import default_workers
from ..data import find_pairs
from ..errors import CadsamError
from ..evaluation import EvalData, constant_prediction_warning, evaluate_on, format_table
from . import common, flags

HELP = "Score trained weights (or zero-shot SAM) on a data set: Dice, IoU, MAE, BER ..."
EVAL_WORKERS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.model_source_flags(parser)
    flags.data_flags(parser)
    flags.add_all(parser, "--ignore-index", "--prompt")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--eval-resolution",
        choices=["train", "original"],
        default="train",
        help="score at the training size (the paper's) or each ground truth's own size",
    )
    flags.add_all(scoring, "--image-size", "--batch-size")
    scoring.add_argument(
        "--sod",
        action="store_true",
        help="also S-measure, E-measure, weighted F (needs cadsam[sod])",
    )
    flags.add(scoring, "--json")
    flags.running_flags(parser)


def run(args: argparse.Namespace) -> None:
    from .. import distributed

    dist = distributed.setup(args.device)
    try:
        data = data_from_flags(args, default_split="test")
        # the precision and the images to score settle auto's frozen_bf16 and compilation
        precision = args.precision or "fp32"
        images = _images_to_score(data, dist.world_size)
        runtime = common.runtime_from_flags(
            args, dist.device, job_images=images, precision=precision
        )
        model, size = common.load_model_source(args, runtime)
        metrics = evaluate_on(
            model.for_inference(),
            size,
            data,
            resolution=args.eval_resolution,
            progress=args.progress is not False,
            dist=dist,
            batch_size=args.batch_size or 4,
            precision=args.precision or "fp32",
            sod=args.sod,
            num_workers=default_workers(EVAL_WORKERS)
            if args.num_workers is None
            else args.num_workers,
        )
        if dist.is_main:
            print(json.dumps(metrics) if args.json else format_table(metrics))
            warning = constant_prediction_warning(metrics)
            if warning:
                print(f"cadsam: {warning}", file=sys.stderr)
    finally:
        distributed.teardown(dist)


def _images_to_score(data: EvalData, processes: int) -> int | None:
    """At most how many images each process scores, from the pairs' names alone (evaluate_on
    finds and checks them again); None where they cannot be paired as they are."""
    where = (data.images, data.masks, data.dataset, data.data_root, data.split)
    try:
        pairs = find_pairs(*where, mask_suffix=data.mask_suffix)
    except CadsamError:  # said by evaluate_on, with --skip-bad's pairs left out there
        return None
    return math.ceil(len(pairs) / processes)


def data_from_flags(args: argparse.Namespace, default_split: str) -> EvalData:
    return EvalData(
        images=args.images,
        masks=args.masks,
        dataset=args.dataset,
        data_root=args.data_root,
        split=args.split or default_split,
        mask_threshold=127 if args.mask_threshold is None else args.mask_threshold,
        mask_suffix=args.mask_suffix,
        resize_masks=bool(args.resize_masks),
        skip_bad=bool(args.skip_bad),
        ignore_index=args.ignore_index,
        coco_category=args.coco_category,
        image_channels=args.image_channels,
        prompt=args.prompt,
    )
