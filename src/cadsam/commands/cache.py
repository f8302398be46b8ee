"""``cadsam cache``: the frozen encoder's output, computed once per image and view, for
training CAD or the decoder without the encoder (the paper's section 5)."""

from __future__ import annotations

import argparse
import os

from ..backbones import DEFAULT_IMAGE_SIZE
from ..errors import CadsamError
from . import common, flags

HELP = "Run the frozen encoder once per image and store the embeddings for training."
CACHE_BATCH = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.transforms import VIEWS

    flags.add(parser, "--backbone")
    flags.add(parser, "--checkpoint")
    flags.add(parser, "--out", metavar="CACHE")
    flags.data_flags(parser, masks=False)
    stored = parser.add_argument_group("what is stored")
    stored.add_argument(
        "--views",
        nargs="+",
        default=["identity"],
        metavar="VIEW",
        help=f"views to store per image, any of: {', '.join(VIEWS)} (default: identity)",
    )
    flags.add_all(stored, "--image-size", "--batch-size")
    stored.add_argument(
        "--dtype", choices=["float16", "float32"], default="float16", help="stored precision"
    )
    flags.running_flags(parser)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="read every done embedding in --out back against its digest and report damaged "
        "ones (building again computes them again); builds nothing",
    )
    flags.renamed(parser, "--compile", "--set compile_encoder=true", "compile", switch_value=True)
    parser.epilog = (
        "Interrupted? Run the same command again: it continues where it stopped. Train from it "
        "with cadsam train --cache CACHE and the same --checkpoint."
    )


def run(args: argparse.Namespace) -> None:
    from ..cache import build_cache, recorded_precision
    from ..data.io import parse_channels
    from ..distributed import pick_device

    if args.out is None:
        raise CadsamError("--out is required: the cache folder")
    if args.verify:
        from ..cache import verify_cache

        print(f"cache: {verify_cache(args.out)}")
        return
    if args.backbone is None:
        raise CadsamError("--backbone is required to build a cache (--verify checks one without)")
    images = _images(args)
    if getattr(args, "compile", False):
        args.overrides = [*(args.overrides or []), "compile_encoder=true"]
    # checked now, said with the result: a refused checkpoint or image is the first line
    runtime = common.runtime_from_flags(args, pick_device(args.device), "zero-shot", say=False)
    cache = build_cache(
        images,
        args.out,
        args.backbone,
        args.checkpoint,
        args.views,
        args.image_size or DEFAULT_IMAGE_SIZE,  # train's: the cache is read at its size
        args.batch_size or CACHE_BATCH,
        args.precision or recorded_precision(args.out) or "fp32",
        args.dtype,
        args.device,
        runtime,
        args.num_workers,
        progress=args.progress is not False,
        skip_bad=bool(args.skip_bad),
        channels=parse_channels(args.image_channels),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cache: {args.out} ({len(cache.done)} embeddings, complete: {cache.complete()})")
        print(f"cache: {cache.describe_entry()}")
        print(f"cache: the encoder ran {runtime.describe()}")


def _images(args: argparse.Namespace) -> list:
    from ..data import layout_pairs
    from ..data.io import list_images

    if args.dataset:
        if args.images or not args.data_root:
            raise CadsamError("give --images DIR, or --dataset LAYOUT --data-root DIR")
        pairs = layout_pairs(args.dataset, args.data_root, args.split or "train")
        return [p.image for p in pairs]
    if args.images:
        images = list_images(args.images)
        if not images:
            raise CadsamError(f"no images found in {args.images}")
        return images
    raise CadsamError("give --images DIR, or --dataset LAYOUT --data-root DIR")
