"""``cadsam plan``: will a training run fit a GPU, and how fast does it go; on a CPU, in seconds.

Memory is counted on PyTorch's meta device with constants fitted to the recorded benchmark
runs (:mod:`cadsam.planning`); speeds are quoted from the benchmark rows as measured, on the
card that measured them, never made up for another.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..backbones import DEFAULT_IMAGE_SIZE
from ..data.labels import class_table
from ..data.prompts import TRAIN_NAMES as PROMPT_TRAIN_NAMES
from ..data.prompts import PromptSettings
from ..errors import CadsamError
from ..fast.runtime import RUNTIMES
from ..methods import METHODS
from ..planning import (
    EXACT_UP_TO,
    KNOWN_GPUS,
    PlanRequest,
    largest_batch,
    parse_gpu_memory,
    predict_memory,
    recommend,
    speed_from_bench,
    usable_mib,
)
from . import common, flags

# train's settings besides model options and runtime switches that change a step's memory
PLANNED_TRAINING = ("grad_accum", *PROMPT_TRAIN_NAMES.values())
HELP = "Predict a training run's peak GPU memory and speed before any GPU (runs on a CPU)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add(parser, "--method", choices=[m for m in METHODS if m != "zero-shot"])
    flags.add_all(parser, "--backbone", "--batch-size", "--image-size", "--classes", "--prompt")
    flags.add_all(parser, "--precision", "--runtime", "--set")
    flags.add_all(parser, "--cache")
    parser.add_argument(
        "--gpu-memory",
        metavar="SIZE|CARD",
        help=f"the GPU: its memory (12GiB, 24GB, 12) or a card ({', '.join(KNOWN_GPUS)})",
    )
    flags.add(parser, "--json")
    parser.epilog = (
        "defaults: --method cad, --backbone vit_b, train's batch, 512-pixel images, fp32; "
        "every runtime (plain, lean, auto) unless --runtime names one. --set takes what train "
        "takes that changes memory: model options (adapter_size, lora_rank, ...), runtime "
        "switches, grad_accum and, with --prompt, " + ", ".join(PROMPT_TRAIN_NAMES.values()) + "."
    )


def request_from_args(args: argparse.Namespace, runtime: str) -> PlanRequest:
    options, switches, training = common.sorted_settings(args, PLANNED_TRAINING)
    given = {f: training.pop(n) for f, n in PROMPT_TRAIN_NAMES.items() if n in training}
    if given and not args.prompt:
        names = ", ".join(PROMPT_TRAIN_NAMES[f] for f in given)
        raise CadsamError(f"--set {names}: these are the prompt's; give --prompt")
    prompt = PromptSettings(args.prompt or "whole", **given)
    classes = class_table(args.classes) if args.classes not in (None, "1") else None
    return PlanRequest(
        method=args.method or "cad",
        backbone=args.backbone or "vit_b",
        batch_size=args.batch_size,
        image_size=args.image_size or DEFAULT_IMAGE_SIZE,
        precision=args.precision or "fp32",
        classes=1 if classes is None else classes.count,
        cache=bool(args.cache),
        runtime=runtime,
        settings=tuple(switches.items()),
        prompt=prompt,
        options=tuple(options.items()),
        grad_accum=training.get("grad_accum", 1),
    )


def plan(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every runtime asked for: its estimate, the largest batch that fits, the measured speed;
    and the recommended command. ``progress`` hears of each runtime before it is counted (a
    few seconds each on a small CPU)."""
    gpu_mib = parse_gpu_memory(args.gpu_memory) if args.gpu_memory else None
    runtimes = [args.runtime_name] if args.runtime_name else list(RUNTIMES)
    report: dict[str, Any] = {"gpu_mib": gpu_mib, "runtimes": {}}
    if gpu_mib is not None:
        report["usable_mib"] = round(usable_mib(gpu_mib), 1)
    first = None
    for runtime in runtimes:
        if progress is not None:
            progress(f"counting runtime {runtime} on the meta device")
        request = request_from_args(args, runtime)
        first = first or request
        estimate = predict_memory(request, gpu_mib)
        speed = speed_from_bench(request)
        entry: dict[str, Any] = {**estimate.to_json(), "speed": None}
        if speed is not None:
            entry["speed"] = {**speed.__dict__, "said": speed.describe()}
        if gpu_mib is not None:
            entry["largest_batch"] = largest_batch(request, gpu_mib)
            entry["largest_batch_or_more"] = entry["largest_batch"] == EXACT_UP_TO
        report["runtimes"][runtime] = entry
    if gpu_mib is not None and first is not None:
        advice = recommend(first, gpu_mib)
        report["recommended"] = {"command": advice.command, "why": advice.why}
    return report


def run(args: argparse.Namespace) -> None:
    if args.method == "zero-shot":
        raise CadsamError("--method zero-shot trains nothing: plan a method that trains")
    report = plan(args, lambda line: print(f"plan: {line}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for runtime, entry in report["runtimes"].items():
        print(_lines(runtime, entry, report.get("usable_mib")))
    if "recommended" in report:
        advice = report["recommended"]
        print(f"recommended ({advice['why']}):\n  {advice['command'] or 'none'}")
    else:
        print("give --gpu-memory (a size or a card) to learn whether it fits and what to run")


def _lines(runtime: str, entry: dict[str, Any], usable: float | None) -> str:
    graph = ", CUDA graph" if entry["cuda_graph"] else ""
    lines = [
        f"{runtime}: {entry['total_mib']:,.0f} MiB peak at batch {entry['batch']}{graph} = "
        f"weights {entry['weights_mib']:,.0f} + gradients and AdamW {entry['optimiser_mib']:,.0f}"
        f" + step {entry['activations_mib']:,.0f} + workspace {entry['overhead_mib']:,.0f}"
    ]
    if usable is not None:
        verdict = "fits" if entry["fits"] else "does NOT fit"
        largest = str(entry["largest_batch"])
        if entry["largest_batch_or_more"]:
            largest = f"{largest} or more (counted up to {largest})"
        lines.append(f"  {verdict} in {usable:,.0f} MiB usable; largest batch that fits: {largest}")
    speed = entry["speed"]
    lines.append(f"  speed: {speed['said'] if speed else 'no measured row near this setting'}")
    return "\n".join(lines)


__all__ = ["HELP", "add_arguments", "plan", "run"]
