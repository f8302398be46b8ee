"""Every flag of the ``cadsam`` commands, defined once: a flag means one thing, with one default
and one help text, in every command that takes it (``tests/test_commands.py`` walks the parsers
to hold that). A command may narrow a flag's choices, name its value (``metavar``) or require it;
nothing else.

A flag that takes several values is plural (``--backbones``), one that takes one value singular
(``--backbone``). An old spelling still works for a while, with a one-line notice naming the new.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..backbones import BACKBONES
from ..fast.runtime import RUNTIMES
from ..methods import METHODS
from ..precision import PRECISIONS

_BACKBONES = ", ".join(BACKBONES)
_METHODS = ", ".join(METHODS)

# name -> argparse keywords. Every default is None, a switch's too: a flag not given never
# overrides a config file, and a command's own default, where one differs (a training run's
# epochs against the demo's), is resolved in the command and stated here in the help.
FLAGS: dict[str, dict[str, Any]] = {
    # what runs
    "--method": dict(choices=list(METHODS), metavar="METHOD", help=f"the method: {_METHODS}"),
    "--methods": dict(
        nargs="+", choices=list(METHODS), metavar="METHOD", help=f"methods, any of: {_METHODS}"
    ),
    "--backbone": dict(
        choices=list(BACKBONES), metavar="BACKBONE", help=f"the SAM backbone: {_BACKBONES}"
    ),
    "--backbones": dict(
        nargs="+",
        choices=list(BACKBONES),
        metavar="BACKBONE",
        help=f"SAM backbones, any of: {_BACKBONES}",
    ),
    "--checkpoint": dict(
        help="base SAM weights: Meta's .pth/.pt, a Hugging Face SamModel file or folder, or a "
        "released backbone's name (vit_b, sam2.1_hiera_b+, ...: downloaded if absent); for "
        "trained weights, where their base checkpoint is now, if it moved",
    ),
    "--random-weights": dict(
        action="store_true",
        default=None,
        help="run a pretrained backbone on random weights, on purpose (no --checkpoint)",
    ),
    "--weights": dict(
        help="what cadsam train saved: a weights file, or its run folder (best, else last)"
    ),
    "--cache": dict(
        metavar="DIR",
        help="train from this embedding cache (cadsam cache): no image encoder in memory "
        "(plan: the folder is not read)",
    ),
    # data
    "--images": dict(metavar="PATH", help="images: a folder (predict: a folder or one image file)"),
    "--masks": dict(
        metavar="DIR|FILE.json",
        help="masks, paired with the images by file stem (see --mask-suffix), or a COCO JSON file",
    ),
    "--mask-suffix": dict(
        metavar="SUFFIX",
        help="masks are named <image stem>SUFFIX: --mask-suffix _mask pairs 00.png with "
        "00_mask.png",
    ),
    "--dataset": dict(metavar="LAYOUT", help="a named layout: istd, camo, cod10k, sinet"),
    "--data-root": dict(
        metavar="DIR",
        help="the folder holding the named layout (reproduce: the one holding ISTD/, CAMO/ and "
        "COD10K/, each in its layout)",
    ),
    "--split": dict(
        help="the named layout's split (default: train for train and cache, test for eval)"
    ),
    "--mask-threshold": dict(
        type=int, metavar="VALUE", help="8-bit mask values above it are foreground (default 127)"
    ),
    "--classes": dict(
        metavar="K|FILE",
        help="several classes: their number, or a YAML/JSON class file naming them "
        "(docs/data.md), whose masks are label maps of class indices (default: one class, "
        "binary masks)",
    ),
    "--ignore-index": dict(
        type=int,
        metavar="VALUE",
        help="the label maps' value for pixels of no class, left out of loss and scores "
        "(default: the class file's, else 255; eval and predict: the weights')",
    ),
    "--coco-category": dict(
        metavar="NAME",
        help="--masks is a COCO JSON file and the task binary: the category to segment",
    ),
    "--image-channels": dict(
        metavar="C[,C,C]",
        help="which channels of multi-channel (TIFF) images make the RGB the model sees: one "
        "(grey) or three, from 0 (default: the first three; eval: the weights')",
    ),
    "--prompt": dict(
        choices=["whole", "box", "points", "box+points"],
        help="the prompt: the whole image (default, the paper's), or each object's box, points "
        "or both, drawn from the masks (docs/prompts.md)",
    ),
    "--resize-masks": dict(
        action="store_true",
        default=None,
        help="resize a mask whose size differs from its image's (default: an error)",
    ),
    "--skip-bad": dict(
        action="store_true",
        default=None,
        help="skip inputs that cannot be read or paired, naming each, instead of failing",
    ),
    "--image-size": dict(
        type=int,
        metavar="PIXELS",
        help="the square size images are resized to for the model (default: the size the "
        "weights were trained at; a new run 512, the demo 128)",
    ),
    "--num-workers": dict(
        type=int,
        metavar="N",
        help="data-loader processes (default: 2, cache 4; never more than the usable cores)",
    ),
    "--batch-size": dict(
        type=int,
        metavar="N",
        help="images per step and process (default: train 4, or 2 for vit_h and "
        "sam2.1_hiera_l; eval 4; cache 8)",
    ),
    "--epochs": dict(type=int, metavar="N", help="training epochs (default 20; the demo 10)"),
    # how it runs
    "--precision": dict(
        choices=list(PRECISIONS), help="fp32 (default) or bf16 autocast: what the model computes in"
    ),
    "--precisions": dict(
        nargs="+", choices=list(PRECISIONS), metavar="PRECISION", help="fp32, bf16 or both"
    ),
    "--runtime": dict(
        dest="runtime_name",
        choices=list(RUNTIMES),
        help="how a model runs, never what it computes: auto (default: the fastest path that "
        "fits the device), lean (the least memory) or plain (the reference path)",
    ),
    "--set": dict(
        action="append",
        dest="overrides",
        metavar="NAME=VALUE",
        help="one setting by name, repeatable: a runtime switch (docs/runtime.md); for train "
        "also any training setting or model option",
    ),
    "--device": dict(help="cpu, cuda or cuda:N (default: cuda if a GPU is visible)"),
    "--no-progress": dict(
        dest="progress", action="store_false", default=None, help="no progress bars"
    ),
    # what comes out
    "--out": dict(
        metavar="PATH", help="where the command writes (its description says what); created"
    ),
    "--json": dict(
        action="store_true", default=None, help="print JSON for scripts instead of a table"
    ),
}


def add(parser: argparse.ArgumentParser | Any, name: str, **narrowed: Any) -> argparse.Action:
    """Add flag ``name`` as :data:`FLAGS` defines it; ``narrowed`` may only require it, narrow
    its choices or name its value."""
    assert set(narrowed) <= {"required", "choices", "metavar"}, narrowed
    definition = {**FLAGS[name], **narrowed}
    if "choices" in narrowed:
        assert set(narrowed["choices"]) <= set(FLAGS[name]["choices"]), name
    return parser.add_argument(name, **definition)


def add_all(parser: argparse.ArgumentParser | Any, *names: str) -> None:
    for name in names:
        add(parser, name)


class _Renamed(argparse.Action):
    """An old spelling: stores into the new flag's ``dest``, with a one-line notice."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"cadsam: note: {option_string} is now {self.new} (the old name will go)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def renamed(
    parser: argparse.ArgumentParser | Any,
    old: str,
    new: str,
    dest: str,
    *,
    switch_value: Any = None,
    nargs: str | None = None,
) -> None:
    """Keep ``old`` working as ``new`` (hidden from --help). ``switch_value``: the old flag
    took no value, and stands for the new one given this value."""
    parser.add_argument(
        old,
        action=_Renamed,
        new=new,
        dest=dest,
        nargs=nargs if switch_value is None else 0,
        const=switch_value,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


def data_flags(parser: argparse.ArgumentParser, *, masks: bool = True) -> None:
    """Where a command reads its images (and masks): a folder pair or a named layout."""
    data = parser.add_argument_group("data (a folder pair, or a named layout)")
    add(data, "--images")
    if masks:
        add_all(data, "--masks", "--mask-suffix")
    add_all(data, "--dataset", "--data-root", "--split")
    if masks:
        add_all(data, "--mask-threshold", "--coco-category", "--resize-masks")
    add_all(data, "--image-channels", "--skip-bad", "--num-workers")


def running_flags(parser: argparse.ArgumentParser) -> None:
    """How a command runs a model: device, precision, runtime and its switches, progress."""
    running = parser.add_argument_group("running (speed and memory; never what is computed)")
    add_all(running, "--device", "--precision", "--runtime", "--set", "--no-progress")
