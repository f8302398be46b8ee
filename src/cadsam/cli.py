"""The ``cadsam`` command. Each subcommand is a function taking the parsed arguments.

User mistakes raise :class:`CadsamError`; they are printed as one line and exit with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import torch

from .errors import CadsamError
from .methods import METHODS, build_model
from .sam import SAM_CONFIGS


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
