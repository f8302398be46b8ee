"""``cadsam reproduce``: the paper's experiments (section 4) in one command.

For every data set x backbone x method: train with the paper's protocol (20 epochs, batch 4 /
2, 512 pixels, whole-image box, BCE + IoU, AdamW, the authors' effectively constant learning
rate), evaluate on the test split, and write Tables 1-4 and Figures 6-8 with the paper's
figures beside ours. Finished runs are skipped, interrupted ones resumed, so the command can be
stopped and run again. Everything missing (data sets, checkpoints) is reported before any
training starts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data import SegmentationDataset, layout_pairs, scan_pairs
from ..distributed import Dist, pick_device
from ..errors import CadsamError
from ..evaluation import evaluate
from ..fast.runner import fit
from ..fast.runtime import resolve_runtime
from ..files import write_atomic
from ..lock import holds_out_lock
from ..methods import build_model
from ..sam.checkpoint import META_CHECKPOINTS
from ..training import MIN_GAIN, train
from ..weights import load_weights
from . import common, flags
from .figures import mask_rows, pyplot, save_grid
from .paper import MEMORY_TABLES, SCORES

DATASETS = {"istd": "ISTD", "camo": "CAMO", "cod10k": "COD10K"}
METHODS = ("zero-shot", "decoder", "sam-adapter-paper", "lora", "cad")


def checkpoint_file(checkpoint_dir: Path, backbone: str) -> Path:
    name = (
        META_CHECKPOINTS[backbone].filename
        if backbone in META_CHECKPOINTS
        else f"sam_{backbone}.pth"
    )
    return checkpoint_dir / name


def dataset_root(data_root: Path, dataset: str) -> Path:
    for name in (DATASETS[dataset], dataset):
        if (data_root / name).is_dir():
            return data_root / name
    return data_root / DATASETS[dataset]


def check_inputs(
    data_root: Path, checkpoint_dir: Path, datasets: list[str], backbones: list[str]
) -> None:
    """Everything a long run needs, checked before it starts; all problems in one message."""
    problems = []
    for dataset in datasets:
        if dataset not in DATASETS:
            problems.append(f"unknown data set {dataset} (choose from {', '.join(DATASETS)})")
            continue
        for split in ("train", "test"):
            try:
                layout_pairs(dataset, dataset_root(data_root, dataset), split)
            except CadsamError as exc:
                problems.append(str(exc))
    for backbone in backbones:
        path = checkpoint_file(checkpoint_dir, backbone)
        if not path.is_file():
            problems.append(f"{backbone} checkpoint missing: {path}")
    if problems:
        raise CadsamError("cannot start: " + "; ".join(problems))


@holds_out_lock("cadsam reproduce")
def reproduce(
    data_root: str | Path,
    checkpoint_dir: str | Path,
    out: str | Path,
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    methods: list[str] | None = None,
    epochs: int = 20,
    image_size: int = 512,
    adapter_size: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,  # None: training's default
    progress: bool = True,
    runtime: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> Path:
    data_root, checkpoint_dir, out = Path(data_root), Path(checkpoint_dir), Path(out)
    datasets = datasets or list(DATASETS)
    backbones = backbones or ["vit_b", "vit_h"]
    methods = methods or list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise CadsamError(
            f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}"
        )
    if adapter_size is not None and "cad" not in methods:
        raise CadsamError("--adapter-size is CAD's adapter input, and --methods names no cad")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CadsamError(
            "reproduce runs its trainings one after another in one process, not under "
            "torchrun: run it with python or cadsam, or give torchrun one cadsam train at a time"
        )
    check_inputs(data_root, checkpoint_dir, datasets, backbones)
    say = print  # status lines always; ``progress`` governs the bars
    protocol = dict(
        epochs=epochs,
        image_size=image_size,
        adapter_size=512 if adapter_size is None else adapter_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
        runtime={"name": "auto", **(runtime or {})},
        precision=precision,
    )
    results = []
    for dataset in datasets:
        root = dataset_root(data_root, dataset)
        test_pairs, _ = scan_pairs(layout_pairs(dataset, root, "test"), progress=progress)
        for backbone in backbones:
            checkpoint = str(checkpoint_file(checkpoint_dir, backbone))
            for method in methods:
                name = f"{dataset}_{backbone}_{method}"
                result_path = out / "runs" / name / "result.json"
                if result_path.is_file():
                    say(f"{name}: done, skipped")
                    results.append(json.loads(result_path.read_text()))
                    continue
                say(f"{name}: {'evaluating' if method == 'zero-shot' else 'training'}")
                result = _run_one(
                    dataset,
                    root,
                    backbone,
                    checkpoint,
                    method,
                    test_pairs,
                    out / "runs" / name,
                    **protocol,
                )
                # whole or absent: a run stopped here is run again, not read half-written
                text = json.dumps(result, indent=1)
                write_atomic(result_path, lambda tmp, text=text: tmp.write_text(text))
                results.append(result)
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    report = write_report(out, results, data_root)
    for shortfall in not_better_than_zero_shot(results):
        print(f"cadsam: warning: {shortfall}", file=sys.stderr)
    return report


def _run_one(
    dataset: str,
    root: Path,
    backbone: str,
    checkpoint: str,
    method: str,
    test_pairs: list,
    run: Path,
    *,
    epochs: int,
    image_size: int,
    adapter_size: int,
    device: str | None,
    num_workers: int | None,
    progress: bool,
    runtime: dict[str, Any],
    precision: str,
) -> dict[str, Any]:
    run.mkdir(parents=True, exist_ok=True)
    peak = None
    if method == "zero-shot":
        model = build_model("zero-shot", backbone, checkpoint)
    else:
        config = TrainConfig(
            method=method,
            backbone=backbone,
            checkpoint=checkpoint,
            out=str(run),
            dataset=dataset,
            data_root=str(root),
            epochs=epochs,
            image_size=image_size,
            schedule="constant",
            options={"adapter_size": adapter_size} if method == "cad" else {},
            device=device,
            num_workers=num_workers,
            progress=progress,
            runtime=runtime,
            precision=precision,
            resume=(run / "state.pt").exists(),
        )
        train(config)
        model, _ = load_weights(run / "last.safetensors")
        lines = (run / "metrics.jsonl").read_text().splitlines()
        peak = max((json.loads(x).get("peak_memory_mib") or 0 for x in lines), default=0) or None
    target = pick_device(device)
    settings = {k: v for k, v in runtime.items() if k not in ("name", "cuda_graph")}
    fit(model, resolve_runtime(runtime["name"], settings, target)[0])
    metrics = evaluate(
        model.to(target),
        SegmentationDataset(test_pairs, image_size),
        batch_size=4,
        precision=precision,
        progress=progress,
        dist=Dist(device=target),
    )
    return {
        "dataset": dataset,
        "backbone": backbone,
        "method": method,
        "checkpoint": checkpoint,
        "trainable": model.parameter_counts()["trainable"],
        "peak_memory_mib": peak,
        "dice": metrics["dice"],
        "iou": metrics["iou"],
        "weights": str(run / "last.safetensors") if method != "zero-shot" else None,
    }


def write_report(out: Path, results: list[dict[str, Any]], data_root: Path) -> Path:
    """Tables 1-4 (markdown and CSV) and Figures 6-8 from ``results``."""
    _write_csv(out / "tables.csv", results)
    lines = ["# The paper's experiments, reproduced", ""]
    backbones = sorted({r["backbone"] for r in results})
    for number, backbone in enumerate(backbones, start=1):
        lines += _memory_table(number, backbone, results)
    for number, backbone in enumerate(backbones, start=3):
        lines += _score_table(number, backbone, results)
    lines += _zero_shot_section(results)
    figures = _plot_tradeoffs(out, results, backbones)
    _example_grid(out / "fig8_examples.png", results, data_root)
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in figures]
    lines += ["", "![fig8](fig8_examples.png)", ""]
    report = out / "tables.md"
    report.write_text("\n".join(lines))
    return report


def not_better_than_zero_shot(results: list[dict[str, Any]]) -> list[str]:
    """A line for each trained run whose test Dice is not above zero-shot SAM's on the same
    data set and backbone (by training's ``MIN_GAIN``): it ended no better than its start."""
    zero_shot = {
        (r["dataset"], r["backbone"]): r["dice"] for r in results if r["method"] == "zero-shot"
    }
    lines = []
    for r in results:
        start = zero_shot.get((r["dataset"], r["backbone"]))
        if r["method"] == "zero-shot" or start is None or r["dice"] >= start + MIN_GAIN:
            continue
        lines.append(
            f"{r['dataset']} {r['backbone']} {r['method']}: test Dice {r['dice']:.4f}, not "
            f"better than zero-shot SAM's {start:.4f}"
        )
    return lines


def _zero_shot_section(results: list[dict[str, Any]]) -> list[str]:
    """The report's word on which trained runs beat zero-shot SAM, where it was run."""
    compared = {(r["dataset"], r["backbone"]) for r in results if r["method"] == "zero-shot"}
    trained = [r for r in results if r["method"] != "zero-shot"]
    if not any((r["dataset"], r["backbone"]) in compared for r in trained):
        return []
    shortfalls = not_better_than_zero_shot(results)
    if not shortfalls:
        better = "Every trained run scores a higher test Dice than zero-shot SAM on its data set"
        return [f"{better} and backbone.", ""]
    heading = "Not better than zero-shot SAM (test Dice, same data set and backbone):"
    return [heading, "", *(f"- {line}" for line in shortfalls), ""]


def _write_csv(path: Path, results: list[dict[str, Any]]) -> None:
    columns = ["dataset", "backbone", "method", "dice", "iou", "paper_dice", "paper_iou"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "trainable", "peak_memory_mib"])
        for r in results:
            paper = SCORES.get((r["backbone"], r["dataset"]), {}).get(r["method"], ("", ""))
            scores = [f"{r['dice']:.4f}", f"{r['iou']:.4f}", *paper]
            row = [r["dataset"], r["backbone"], r["method"], *scores, r["trainable"]]
            writer.writerow([*row, r["peak_memory_mib"] or ""])


def _memory_table(number: int, backbone: str, results: list[dict[str, Any]]) -> list[str]:
    """Tables 1-2: per method, trainable parameters and the largest training peak."""
    rows = [r for r in results if r["backbone"] == backbone and r["method"] != "zero-shot"]
    lines = [
        f"## Table {number}: trainable parameters and training memory ({backbone})",
        "",
        "| method | trainable | paper: trainable | peak memory (MiB) | paper: memory (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        ours = [r for r in rows if r["method"] == method]
        peaks = [r["peak_memory_mib"] for r in ours if r["peak_memory_mib"]]
        paper = MEMORY_TABLES.get((backbone, method), ("-", "-"))
        memory = f"{max(peaks):,.0f}" if peaks else "- (CPU run)"
        lines.append(
            f"| {method} | {ours[0]['trainable']:,} | {_fmt(paper[0])} | {memory} "
            f"| {_fmt(paper[1])} |"
        )
    return [*lines, ""]


def _score_table(number: int, backbone: str, results: list[dict[str, Any]]) -> list[str]:
    """Tables 3-4: Dice / IoU per data set, the paper's beside ours."""
    datasets = [
        d for d in DATASETS if any(r["dataset"] == d and r["backbone"] == backbone for r in results)
    ]
    lines = [
        f"## Table {number}: Dice / IoU ({backbone}; ours, paper's in brackets)",
        "",
        "| method | " + " | ".join(f"{d.upper()} Dice | {d.upper()} IoU" for d in datasets) + " |",
        "| --- |" + " ---: | ---: |" * len(datasets),
    ]
    found = {(r["dataset"], r["backbone"], r["method"]): r for r in results}
    for method in METHODS:
        cells = []
        for d in datasets:
            r = found.get((d, backbone, method))
            paper = SCORES.get((backbone, d), {}).get(method)
            for i, key in enumerate(("dice", "iou")):
                ours = f"{r[key]:.4f}" if r else "-"
                cells.append(f"{ours} ({paper[i]:.4f})" if paper else ours)
        if any(c != "-" for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fmt(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _plot_tradeoffs(out: Path, results, backbones) -> list[str]:
    """Figures 6-7: Dice against training memory (trainable parameters on a CPU run)."""
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    for number, backbone in enumerate(backbones, start=6):
        rows = [r for r in results if r["backbone"] == backbone and r["method"] != "zero-shot"]
        on_gpu = all(r["peak_memory_mib"] for r in rows)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in rows:
            x = r["peak_memory_mib"] if on_gpu else r["trainable"]
            ax.scatter(x, r["dice"], s=50)
            ax.annotate(
                f"{r['method']} ({r['dataset']})",
                (x, r["dice"]),
                textcoords="offset points",
                xytext=(5, 3),
                fontsize=7,
            )
        ax.set_xlabel(
            "peak training memory (MiB)"
            if on_gpu
            else "trainable parameters (CPU run: no GPU memory)"
        )
        ax.set_ylabel("Dice")
        ax.set_title(f"Figure {number}: Dice / memory, {backbone}")
        fig.tight_layout()
        path = out / f"fig{number}_{backbone}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _example_grid(
    path: Path, results, data_root: Path, per_dataset: int = 2, size: int = 256
) -> None:
    """Figure 8: per row an image, its ground truth, then each run's mask in the order of
    ``results`` (backbones, then methods)."""
    rows, columns = [], []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        models = [
            load_weights(r["weights"])[0].for_inference()
            if r["weights"]
            else build_model("zero-shot", r["backbone"], r["checkpoint"])
            for r in runs
        ]
        columns = ["image", "ground truth", *(f"{r['method']} ({r['backbone']})" for r in runs)]
        pairs = layout_pairs(dataset, dataset_root(data_root, dataset), "test")[:per_dataset]
        rows += mask_rows(models, pairs, size)
    save_grid(rows, path, columns)


HELP = (
    "Rerun the paper's experiments (Tables 1-4, Figures 6-8); rerun to continue after an "
    "interruption."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    flags.add(parser, "--methods", choices=list(METHODS))
    flags.add_all(parser, "--epochs", "--image-size", "--num-workers")
    parser.add_argument("--adapter-size", type=int, help="cad's adapter input (default 512)")
    flags.running_flags(parser)
    parser.epilog = "defaults: every data set, vit_b and vit_h, every method of the paper and LoRA"


def run(args: argparse.Namespace) -> None:

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
