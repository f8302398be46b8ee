"""``cadsam params``: trainable and total parameters, counted on PyTorch's meta device."""

from __future__ import annotations

import argparse
import json

import torch

from ..backbones import BACKBONES, RELEASED_BACKBONES
from ..data.labels import ClassTable, class_table
from ..methods import METHODS, build_model, check_method_on_backbone, runs_on
from . import flags

HELP = "Count methods' trainable and total parameters, per backbone."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_all(parser, "--backbones", "--methods", "--classes", "--json")
    # one backbone or method by its singular name, as everywhere else (several work too)
    for name, choices in (("--backbone", BACKBONES), ("--method", METHODS)):
        parser.add_argument(
            name,
            nargs="+",
            choices=list(choices),
            dest=name[2:] + "s",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    parser.epilog = (
        "defaults: every backbone Meta released weights for, every method that runs on it; "
        "one class (--classes K: the decoder's K output tokens counted in)"
    )


def run(args: argparse.Namespace) -> None:
    backbones = args.backbones or RELEASED_BACKBONES
    classes = class_table(args.classes)
    for backbone in backbones:  # a method named where it does not run: an error, not a skip
        for method in args.methods or ():
            check_method_on_backbone(method, backbone)
    rows = []
    for backbone in backbones:
        for method in args.methods or [m for m in METHODS if _counted(m, backbone, classes)]:
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                counts = build_model(method, backbone, classes=classes).parameter_counts()
            rows.append({"method": method, "backbone": backbone, **counts})
            if classes is not None:
                rows[-1]["classes"] = classes.count
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    elif len(rows) == 1:
        row = rows[0]
        print(
            f"{row['method']} on {row['backbone']}: {row['trainable']:,} trainable "
            f"of {row['total']:,} parameters"
        )
    else:
        _table(rows)


def _counted(method: str, backbone: str, classes: ClassTable | None) -> bool:
    """By default every method that runs on the backbone (with classes: that trains)."""
    return runs_on(method, backbone) and not (classes is not None and method == "zero-shot")


def _table(rows: list[dict]) -> None:
    wide = max(len("backbone"), *(len(row["backbone"]) for row in rows))
    print(f"{'backbone':<{wide}} {'method':<18} {'trainable':>12} {'total':>13}")
    for row in rows:
        print(
            f"{row['backbone']:<{wide}} {row['method']:<18} {row['trainable']:>12,} "
            f"{row['total']:>13,}"
        )
