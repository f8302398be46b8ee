"""``cadsam train``: its flags are what a user decides; every other setting is reached by name
with ``--set NAME=VALUE`` (or a ``--config`` file's key), as the Python API reaches them."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from ..config import SCHEDULES, TRAIN_WORKERS, TrainConfig, run_config, sort_settings
from ..fast.runtime import Runtime
from ..methods import METHOD_OPTIONS, METHODS
from . import common, flags

HELP = "Train a method on a data set; writes weights, config and metrics into --out."

# TrainConfig's settings that no flag of train sets: --set NAME=VALUE or a --config file's key
SET_ONLY_TRAINING = (
    "grad_accum",
    "weight_decay",
    "schedule",
    "seed",
    "tensorboard",
    "prompts_per_image",
    "prompt_points",
    "prompt_negatives",
    "box_jitter",
    "memory_check",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of settings (command-line flags override it)",
    )
    flags.add(parser, "--method", choices=[m for m in METHODS if m != "zero-shot"])
    flags.add_all(parser, "--backbone", "--checkpoint", "--random-weights")
    flags.add(parser, "--out", metavar="RUN")
    flags.data_flags(parser)
    flags.add_all(parser, "--classes", "--ignore-index", "--prompt")
    val = parser.add_argument_group(
        "validation (optional; the best epoch is kept as best.safetensors)"
    )
    val.add_argument(
        "--val-fraction", type=float, help="hold out this fraction of the training pairs"
    )
    val.add_argument("--val-images", help="validation images folder")
    val.add_argument("--val-masks", help="validation masks folder")
    opt = parser.add_argument_group("optimisation (defaults: the paper's)")
    flags.add_all(opt, "--epochs", "--batch-size")
    opt.add_argument("--lr", type=float, help="default 2e-4 (AdamW)")
    flags.add(opt, "--image-size")
    opt.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=None,
        help="resize only, no flips or rotations",
    )
    running = parser.add_argument_group("running")
    flags.add_all(running, "--cache")
    running.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --out (with --epochs N above its own: train it longer)",
    )
    flags.add_all(running, "--device", "--precision", "--runtime", "--set", "--no-progress")
    parser.epilog = _set_epilog()


def _set_epilog() -> str:
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
        f"  runtime (speed and memory only; docs/runtime.md): {runtime}\n"
        f"--num-workers defaults to {TRAIN_WORKERS}, at most the usable cores.\n"
        "e.g. --set adapter_size=256 --set schedule=constant --set cuda_graph=true"
    )


def run(args: argparse.Namespace) -> None:
    from ..training import train

    config = run_config(args.config, given_settings(args))
    train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"weights: {Path(config.out) / 'last.safetensors'}")


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, in TrainConfig's keys: each flag's ``dest`` is
    its key, and ``--set NAME=VALUE`` reaches the rest by name."""
    skip = ("func", "command", "config", "overrides", "runtime_name")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    if args.runtime_name:
        given["runtime"] = args.runtime_name
    # every flag's dest is a setting: a name sort_settings does not know came from --set
    return sort_settings({**given, **common.settings(args)}, said_as="--set ")
