"""``cadsam bench``: peak GPU memory and training speed per method and runtime, laid out like
the paper's Tables 1-2 (the measuring itself: :mod:`cadsam.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CadsamError
from . import common, flags

HELP = "Measure peak GPU memory and training speed per method (needs a CUDA GPU)."
RUNTIME_SUFFIXES = {"auto": "", "lean": "-lean", "plain": "-plain"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench import VARIANTS

    flags.add(parser, "--backbones")
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        choices=[*VARIANTS, "encoder-forward"],
        help=f"methods under a runtime, any of: {', '.join(VARIANTS)}, encoder-forward "
        "(default: all; on SAM 2.1 all but SAM-Adapter's, which are SAM 1 only)",
    )
    flags.renamed(parser, "--methods", "--variants", "variants", nargs="+")
    flags.add(parser, "--precisions")
    flags.renamed(parser, "--precision", "--precisions", "precisions", nargs="+")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    flags.add_all(parser, "--runtime", "--set")
    flags.add(parser, "--out", metavar="DIR")
    parser.epilog = (
        "--backbones defaults to vit_b vit_h, --precisions to fp32 bf16, --out to bench. "
        "--runtime lean or plain measures each variant named without a runtime under it "
        "(cad as cad-lean); --set sets a runtime switch in every variant measured."
    )


def run(args: argparse.Namespace) -> None:
    from ..bench import run_bench

    out = args.out or "bench"
    run_bench(
        args.backbones or ["vit_b", "vit_h"],
        under_runtime(args.variants, args.runtime_name or "auto"),
        args.precisions or ["fp32", "bf16"],
        Path(out),
        args.steps,
        overrides=common.settings(args),
    )
    print(f"wrote {out}/bench.json, bench.md, bench_memory.png")


def under_runtime(variants: list[str] | None, runtime: str) -> list[str] | None:
    """The variants measured under ``runtime``: those named without a runtime take it."""
    from ..bench import VARIANTS

    if runtime == "auto" or variants is None:
        if variants is None and runtime != "auto":
            raise CadsamError(f"--runtime {runtime} needs --variants: the default list names each")
        return variants
    chosen = []
    for variant in variants:
        named = variant.endswith(("-lean", "-plain")) or variant == "encoder-forward"
        renamed = variant if named else variant.removesuffix("-eager") + RUNTIME_SUFFIXES[runtime]
        if renamed not in VARIANTS and not named:
            raise CadsamError(f"--variants {variant} has no --runtime {runtime} form")
        chosen.append(renamed)
    return chosen
