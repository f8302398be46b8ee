"""``cadsam demo``: the whole workflow in a few minutes on a CPU, with nothing to download.

Makes a synthetic set (camouflaged textures, soft shadows), caches the frozen encoder's
embeddings once, trains ``decoder`` and ``cad`` from the cache and ``sam-adapter-paper`` and
``lora`` (the field's usual parameter-efficient baseline) with the encoder, scores all four on
held-out images and writes a report: a table, the accuracy/memory trade-off and example masks.

Without a checkpoint it runs ``vit_tiny`` with random weights (saved as a file so that every
step, weights and all, is as with a real checkpoint); ``--backbone sam2.1_hiera_tiny_test``
runs SAM 2.1's small random configuration the same way. With a real SAM checkpoint, given or
found in the checkpoint cache, it uses that instead; a given SAM 2.1 checkpoint works too, less
``sam-adapter-paper``, which prompts the tokens of SAM's ViT encoder (SAM 2.1 has a Hiera trunk).

At this toy scale CAD's adapter keeps more activations than a tiny encoder's decoder does, so
the memory the paper is about is also measured at the paper's scale (ViT-B, batch 4, a
512-pixel adapter), on PyTorch's meta device: shapes only, in about a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..backbones import (
    TEST_BACKBONES,
    backbone_config,
    build_base,
    is_sam2,
    resolve_base_checkpoint,
)
from ..cache import build_cache
from ..config import TrainConfig
from ..cores import share_cores, usable_cores
from ..data import SegmentationDataset, pair_folders
from ..data.synthetic import make_synthetic_set
from ..errors import CadsamError
from ..evaluation import evaluate
from ..lock import holds_out_lock
from ..methods import CACHEABLE, METHOD_OPTIONS, SAM1_ONLY_WHY, build_model, runs_on
from ..sam import SAM_CONFIGS
from ..sam.checkpoint import (
    META_CHECKPOINTS,
    checkpoint_dir,
    encoder_signature,
    is_sam2_checkpoint,
    read_checkpoint_file,
    sam_state_dict,
)
from ..sam2 import SAM2_CONFIGS
from ..sam2.checkpoint import sam2_state_dict, trunk_signature
from ..step import segmentation_loss
from ..training import train
from ..weights import load_weights
from . import common, flags
from .figures import mask_rows, pyplot, save_grid
from .paper import MEMORY_TABLES, PAPER_DEVICE, PAPER_MEASURE, measured_figures

METHODS = ("decoder", "cad", "sam-adapter-paper", "lora")
BATCH = 4
# The paper's setting for its memory tables (ViT-B: batch 4; 1024-pixel encoder input).
PAPER_SCALE = {"backbone": "vit_b", "image_size": 512, "adapter_size": 512}
# Peak allocated MiB while training, ViT-B, batch 4, fp32, by variant (no suffix: cadsam's
# default `auto` runtime), from the canonical GPU run of one commit on one device, with its
# device, date, commit and folder: benchmark_figures.json, generated from benchmarks/results
# by benchmarks/package_figures.py (benchmarks/BENCHMARKS.md tells how they were measured).
GPU_BENCH: dict[str, Any] = measured_figures()["gpu_bench"]
# 95% intervals of each method's mean held-out Dice, from this many bootstrap resamples of its
# images (seeded: a rerun writes the same report).
RESAMPLES = 10_000
# The load average per core from which a run's machine counts as busy: its times are then
# longer than on an idle machine, and the report says so.
BUSY_LOAD = 0.5
LABELS = {"decoder": "decoder", "cad": "CAD", "sam-adapter-paper": "SAM-Adapter", "lora": "LoRA"}
# The paper-scale memory by source: (key in each method's row, how a sentence names it, how
# the figure labels it).
SOURCES = (
    ("kept_mib", "kept for backward", "kept for backward\n(counted here)"),
    (
        "gpu_bench_mib",
        "at peak on the GPU",
        f"peak, cadsam bench\n({GPU_BENCH['device']}, {GPU_BENCH['date']})",
    ),
    ("paper_mib", "in the paper", f"the paper\n({PAPER_DEVICE}, {PAPER_MEASURE})"),
)
# Names in sentences; decoder-only is "decoder" in the figure's legend.
NAMES = {**LABELS, "decoder": "decoder-only"}
# (method, other, expected direction, why): compared in the report, source by source; the why
# is said only where every source with figures for both goes the expected way.
PAIRS = (
    ("cad", "decoder", "more", "its adapter's activations"),
    ("cad", "sam-adapter-paper", "less", "SAM-Adapter keeps its encoder's activations"),
    ("lora", "cad", "more", "like SAM-Adapter, it keeps its encoder's activations"),
    ("lora", "sam-adapter-paper", None, ""),
)
SCORES = ("dice", "iou", "mae")


def pick_backbone(
    checkpoint: str | None, out: Path, backbone: str | None = None
) -> tuple[str, str]:
    """(backbone, checkpoint path): the given checkpoint (SAM or SAM 2.1, a path or the name
    of one of Meta's, as ``train`` takes it); else, for a ``backbone`` of TEST_BACKBONES,
    random weights under ``out``; else a Meta SAM checkpoint already in the cache (smallest
    first), else a random ``vit_tiny`` under ``out``."""
    if checkpoint is not None:
        if backbone is not None:
            raise CadsamError("--checkpoint says the backbone: leave out --backbone")
        path = str(resolve_base_checkpoint(checkpoint))
        return _checkpoint_backbone(path), path
    if backbone not in (None, *TEST_BACKBONES):
        raise CadsamError(
            f"--backbone picks random weights: {', '.join(TEST_BACKBONES)} (for {backbone}, "
            f"give --checkpoint {backbone})"
        )
    if backbone is None:
        for name in ("vit_b", "vit_l", "vit_h"):
            path = checkpoint_dir() / META_CHECKPOINTS[name].filename
            if path.is_file():
                return name, str(path)
        backbone = "vit_tiny"
    path = out / (f"{backbone}_random.pt" if is_sam2(backbone) else f"sam_{backbone}_random.pth")
    if not path.is_file():
        torch.manual_seed(0)
        sam = build_base(backbone)  # in Meta's format: SAM 2.1's state dict under "model"
        torch.save({"model": sam.state_dict()} if is_sam2(backbone) else sam.state_dict(), path)
    return backbone, str(path)


def _checkpoint_backbone(checkpoint: str) -> str:
    """The backbone whose encoder ``checkpoint`` holds, from one read of the file: a SAM 2.1
    Hiera by its trunk where the file is SAM 2.1's, else a SAM ViT by its encoder (a file that
    is neither gets SAM's error)."""
    configs: dict[str, Any]
    path = Path(checkpoint)
    content = read_checkpoint_file(path)
    if is_sam2_checkpoint(content):
        configs, found = SAM2_CONFIGS, trunk_signature(sam2_state_dict(content, path))
    else:
        configs, found = SAM_CONFIGS, encoder_signature(sam_state_dict(content, path))
    for name, config in configs.items():
        if (config.embed_dim, config.depth) == found:
            return name
    raise CadsamError(
        f"{checkpoint} holds an image encoder of no known backbone "
        f"(embed dim {found[0]}, {found[1]} blocks)"
    )


def not_trained_because(method: str, backbone: str) -> str | None:
    """Why the demo leaves ``method`` out on ``backbone`` (said on the console and in the
    report), or None: it trains."""
    if not runs_on(method, backbone):
        return SAM1_ONLY_WHY
    small = not backbone_config(backbone).pretrained  # vit_tiny, sam2.1_hiera_tiny_test
    if method not in CACHEABLE and not small and not torch.cuda.is_available():
        return f"it trains with the {backbone} encoder: far too slow here"
    return None


class _KeptAsFused(torch.autograd.Function):
    """Attention that keeps for backward what the fused kernels keep (q, k, v, the output and
    a float32 log-sum-exp per query), not the score matrix the math fallback keeps on the meta
    device. Only for counting: it has no backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, kwargs):  # type: ignore[override]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernels' B x L x H x D
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(*(t for t in (q, k, v, out, lse, mask) if t is not None))
        return out

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        raise NotImplementedError("counting only")


class _FusedAttentionCount(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            kwargs.update(zip(("attn_mask", "dropout_p", "is_causal", "scale"), rest, strict=False))
            return _KeptAsFused.apply(q, k, v, kwargs.pop("attn_mask", None), kwargs)
        return func(*args, **kwargs)


def kept_for_backward(
    method: str, backbone: str, image_size: int, options: dict[str, Any], batch: int = BATCH
) -> tuple[float, int]:
    """(MiB, trainable parameters): the tensors autograd keeps for backward in one training
    step of ``batch`` images on the plain path in fp32, counted on the meta device (shapes, no
    arithmetic, no memory). Weights, gradients, optimiser state and buffers freed within the
    forward are not counted; the frozen encoder, run without autograd, keeps nothing."""
    with torch.device("meta"):
        model = build_model(method, backbone, **options).train()
        images = torch.empty(batch, 3, image_size, image_size)
        masks = torch.empty(batch, 1, image_size, image_size)
    # A storage is known by its C++ object: meta storages have no data pointers to compare.
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, tuple[Any, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            kept[storage._cdata] = (storage, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttentionCount():
        segmentation_loss(model(images), masks)
    trainable = model.parameter_counts()["trainable"]
    return sum(n for _, n in kept.values()) / 2**20, trainable


@holds_out_lock("cadsam demo")
def run_demo(
    out: str | Path = "cadsam-demo",
    checkpoint: str | None = None,
    n_train: int = 48,
    n_test: int = 16,
    size: int = 128,
    epochs: int = 10,
    adapter_size: int = 64,
    progress: bool = True,
    backbone: str | None = None,
    runtime: dict[str, Any] | None = None,
    device: str | None = None,
    precision: str = "fp32",
) -> Path:
    """Run (or finish) the demo in ``out``; print the results table and return the report's
    path. A rerun reuses every finished step with its recorded time and scores. ``backbone``:
    one of TEST_BACKBONES, on random weights, instead of what :func:`pick_backbone` finds.
    ``runtime``, ``device`` and ``precision`` say how the four methods train, as train's
    flags do."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    given = checkpoint
    backbone, checkpoint = pick_backbone(checkpoint, out, backbone)
    own = given is None and backbone in TEST_BACKBONES  # the random weights saved in ``out``
    settings = dict(
        backbone=backbone,
        sam=f"random, {Path(checkpoint).name} in this folder"
        if own
        else str(Path(checkpoint).resolve()),
        n_train=n_train,
        n_test=n_test,
        size=size,
        epochs=epochs,
        adapter_size=adapter_size,
        **({} if precision == "fp32" else {"precision": precision}),  # (fp32: as demos before)
    )
    results = _load_results(out, settings)  # before anything in ``out`` is written over
    data = make_synthetic_set(out / "data", n_train, n_test, size)
    say(f"data: {n_train} train / {n_test} test synthetic images in {out / 'data'}; SAM {backbone}")
    _cache(out, data, checkpoint, results, say)
    test_pairs = pair_folders(data / "test" / "images", data / "test" / "masks")
    test_set = SegmentationDataset(test_pairs, size)
    models = {}
    for method in METHODS:
        reason = not_trained_because(method, backbone)
        if reason is not None:
            say(f"{method}: not trained ({reason})")
            continue
        running = {"runtime": runtime or {"name": "auto"}, "device": device}
        models[method] = _train_method(
            out, method, checkpoint, results, test_set, say, {**running, "precision": precision}
        )
    say("measuring activation memory at ViT-B scale on the meta device ...")
    scale = _memory_at_paper_scale()
    report = _write_report(out, results, scale, models, test_pairs)
    print(_console_table(results, scale))
    print(f"report: {report}")
    return report


def _load_results(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """What an earlier run in ``out`` finished, with its settings; a new record if none. Either
    way this run is added to its runs, with how busy the machine was as it started."""
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else None
    if not isinstance(results, dict) or "settings" not in results:  # none, or an older demo's
        return {"settings": settings, "cache_seconds": None, "methods": {}, "runs": [_start_run()]}
    old = results.get("settings", {})
    changed = [f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
    if changed:
        raise CadsamError(
            f"{out} holds a demo run with other settings ({', '.join(changed)}): "
            "choose another --out, or delete that folder"
        )
    results.setdefault("runs", []).append(_start_run())  # none in an older demo's record
    return results


def _start_run() -> dict[str, Any]:
    """Size this process's threads to the usable cores (:func:`share_cores`) and record the
    run's start: when, the load average then (None where the system has none), the cores and
    the threads, on which the times it measures depend."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "load": None if load is None else round(load, 2),
        "cores": usable_cores(),
        "threads": share_cores(),  # the demo loads its data in this process: no workers
    }


def _save_results(out: Path, results: dict[str, Any]) -> None:
    path = out / "results.json"
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps(results, indent=2) + "\n")
    part.replace(path)


def _cache(out: Path, data: Path, checkpoint: str, results: dict[str, Any], say) -> None:
    """The frozen encoder's embeddings of the training images in four views, built once."""
    s, seconds = results["settings"], results["cache_seconds"]
    if seconds is None:
        say("caching the frozen encoder's embeddings (4 views of each training image) ...")
    else:
        say(f"embedding cache: {out / 'cache'} (built in {seconds:.1f} s)")
    started = time.perf_counter()
    build_cache(  # checks a finished cache against the images, or finishes it
        sorted((data / "train" / "images").iterdir()),
        out / "cache",
        s["backbone"],
        checkpoint,
        ["identity", "hflip", "vflip", "rot90"],
        s["size"],
        batch_size=8,
        precision="fp32",
        num_workers=0,
        progress=False,
    )
    if seconds is None:  # a rerun keeps the time of the build itself, and says which run's
        results["cache_seconds"] = round(time.perf_counter() - started, 1)
        results["cache_run"] = len(results["runs"]) - 1
        _save_results(out, results)


def _train_method(
    out: Path,
    method: str,
    checkpoint: str,
    results: dict[str, Any],
    test_set: SegmentationDataset,
    say,
    running: dict[str, Any],
) -> torch.nn.Module:
    """Train ``method`` (or finish or reuse its run) and score it; returns the trained model.
    ``running``: the runtime, device and precision it trains with."""
    s = results["settings"]
    run = out / "runs" / method
    cached = method in CACHEABLE
    options = {"adapter_size": s["adapter_size"]} if method == "cad" else {}
    if method not in results["methods"]:
        how = (
            "from the cache" if cached else "with the encoder (it changes what the encoder outputs)"
        )
        say(f"training {method} {how}, {_epochs(s['epochs'])} (log: {run / 'train.log'}) ...")
        config = TrainConfig(
            method=method,
            backbone=s["backbone"],
            checkpoint=checkpoint,
            out=str(run),
            images=str(out / "data" / "train" / "images"),
            masks=str(out / "data" / "train" / "masks"),
            cache=str(out / "cache") if cached else None,
            image_size=s["size"],
            epochs=s["epochs"],
            batch_size=BATCH,
            num_workers=0,
            progress=False,
            options=options,
            resume=(run / "state.pt").exists(),  # an interrupted demo continues its runs
            **running,
        )
        run.mkdir(parents=True, exist_ok=True)
        with open(run / "train.log", "a") as log, contextlib.redirect_stdout(log):
            train(config)
    model, _ = load_weights(run / "last.safetensors")  # with its encoder, as a user gets it
    model.eval()
    if method not in results["methods"]:
        kept, _ = kept_for_backward(method, s["backbone"], s["size"], options)
        results["methods"][method] = {
            "trainable": model.parameter_counts()["trainable"],
            "train_seconds": _epoch_seconds(run),
            "run": len(results["runs"]) - 1,  # the run that finished its training
            "kept_mib": round(kept, 1),
        }
    row = results["methods"][method]
    if "dice_per_image" not in row:  # new, or scored by a demo that kept no per-image Dice
        row.update(_held_out_scores(model, test_set))
        _save_results(out, results)
    say(f"{method}: trained in {row['train_seconds']:.1f} s, Dice {row['dice']:.4f} ({run})")
    return model


def _held_out_scores(model: torch.nn.Module, test_set: SegmentationDataset) -> dict[str, Any]:
    """Dice, IoU and MAE, each a mean over the held-out images, and each image's Dice, from
    which the report tells how noisy the mean is."""
    per_image: dict[str, list[float]] = {}
    metrics = evaluate(model, test_set, batch_size=BATCH, progress=False, scores=per_image)
    return {
        **{k: metrics[k] for k in SCORES},
        "dice_per_image": [round(d, 6) for d in per_image["dice"]],
    }


def mean_interval(
    values: list[float], level: float = 0.95, resamples: int = RESAMPLES
) -> tuple[float, float] | None:
    """The ``level`` bootstrap percentile interval of the mean of ``values``: the images
    resampled with replacement, seeded so that a rerun writes the same report. None for fewer
    than two values, whose spread says nothing."""
    if len(values) < 2:
        return None
    data = np.asarray(values, dtype=float)
    draws = np.random.default_rng(0).integers(0, len(data), (resamples, len(data)))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(data[draws].mean(axis=1), [tail, 100 - tail])
    return float(low), float(high)


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _epoch_seconds(run: Path) -> float:
    """The training time of a run: its epochs' times in metrics.jsonl (so that a run resumed
    after an interruption counts every epoch once, and nothing else)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return round(sum(json.loads(line)["seconds"] for line in lines if line.strip()), 1)


def _memory_at_paper_scale() -> dict[str, dict[str, Any]]:
    """Per method: trainable parameters and MiB kept for backward at the paper's ViT-B setting,
    with the GPU benchmark's and the paper's own figures beside them."""
    scale = {}
    for method in METHODS:
        options = {"adapter_size": PAPER_SCALE["adapter_size"]} if method == "cad" else {}
        kept, trainable = kept_for_backward(
            method, PAPER_SCALE["backbone"], PAPER_SCALE["image_size"], options
        )
        scale[method] = {
            "trainable": trainable,
            "kept_mib": round(kept, 1),
            # None where a source has no figure for the method: shown as "-", never as 0.
            "gpu_bench_mib": GPU_BENCH["peak_allocated_mib"].get(method),
            "paper_mib": _paper_mib(method),
        }
    return scale


def _paper_mib(method: str) -> int | None:
    """The paper's ViT-B memory for ``method``; None for a method it has no row for (LoRA)."""
    row = MEMORY_TABLES.get((PAPER_SCALE["backbone"], method))
    return None if row is None else row[1]


def _mib(value: float | None) -> str:
    """A MiB figure for a table, "-" where the source has none; halves round up, as
    benchmarks/BENCHMARKS.md prints them (9,820.5 is 9,821 there, not Python's 9,820)."""
    return "-" if value is None else f"{math.floor(value + 0.5):,}"


def _main_table(results: dict[str, Any], scale: dict[str, dict[str, Any]]) -> list[str]:
    backbone = results["settings"]["backbone"]
    lines = [
        f"| method | trainable ({backbone}) | train (s) | Dice | IoU | MAE "
        f"| kept for backward, this run (MiB) | kept for backward, ViT-B (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        r = results["methods"].get(method)
        at_scale = _mib(scale[method]["kept_mib"])
        if r is None:
            lines.append(f"| {method} | - | not trained | - | - | - | - | {at_scale} |")
            continue
        lines.append(
            f"| {method} | {r['trainable']:,} | {r['train_seconds']:.1f} | {r['dice']:.4f} "
            f"| {r['iou']:.4f} | {r['mae']:.4f} | {r['kept_mib']:,.1f} | {at_scale} |"
        )
    return lines


def _scale_table(scale: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| method | trainable (ViT-B) | kept for backward, counted here (MiB) "
        f"| peak on a GPU, `cadsam bench` ({GPU_BENCH['device']}, {GPU_BENCH['date']}) (MiB) "
        f"| the paper ({PAPER_DEVICE}, {PAPER_MEASURE}) (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method, s in scale.items():
        lines.append(
            f"| {method} | {s['trainable']:,} | {_mib(s['kept_mib'])} "
            f"| {_mib(s['gpu_bench_mib'])} | {_mib(s['paper_mib'])} |"
        )
    return lines


def _console_table(results: dict[str, Any], scale: dict[str, dict[str, Any]]) -> str:
    s = results["settings"]
    return "\n".join(
        [
            "",
            f"Held-out scores ({s['n_test']} synthetic images, SAM {s['backbone']}, "
            f"{_epochs(s['epochs'])}) and activations kept for backward (MiB), in this run and "
            "at the paper's scale (ViT-B, batch 4, 512-pixel adapter):",
            *_main_table(results, scale),
            "",
        ]
    )


def _write_report(out: Path, results, scale, models, test_pairs) -> Path:
    s = results["settings"]
    lines = [
        "# cadsam demo",
        "",
        f"Synthetic camouflage and shadow images ({s['n_train']} to train on, {s['n_test']} "
        f"held out, {s['size']} x {s['size']} pixels), SAM `{s['backbone']}`, "
        f"{_epochs(s['epochs'])} at batch {BATCH}. `decoder` and `cad` train from an embedding "
        f"cache (four views of each image, built in {results['cache_seconds']:.1f} s); "
        "`sam-adapter-paper` and `lora` (low-rank updates of the encoder's attention, rank "
        f"{METHOD_OPTIONS['lora']['lora_rank']}) act inside the encoder, so they train with it, "
        "on the images themselves. Train (s): the epochs' time on this machine. CAD's adapter "
        f"reads the images at {s['adapter_size']} x {s['adapter_size']} here.",
        "",
        *_main_table(results, scale),
        "",
        _times_text(results),
        "",
        *_noise_text(results),
        *_not_trained_text(results),
        *_memory_text(s, scale),
        "",
        "![trade-off](tradeoff.png)"
        if _plot_tradeoff(results, scale, out / "tradeoff.png")
        else "(The trade-off plot needs matplotlib: pip install matplotlib.)",
        "",
        f"Held-out examples (columns: image, ground truth, {', '.join(models)}; two camouflaged "
        "objects, then two shadows):",
        "",
        "![examples](examples.png)",
        "",
    ]
    camo = [p for p in test_pairs if p.id.startswith("camo")][:2]
    shadow = [p for p in test_pairs if p.id.startswith("shadow")][:2]
    save_grid(
        mask_rows(list(models.values()), camo + shadow, s["size"]),
        out / "examples.png",
        columns=["image", "ground truth", *models],
    )
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _not_trained_text(results: dict[str, Any]) -> list[str]:
    """A line per method the table shows as not trained, saying why."""
    backbone = results["settings"]["backbone"]
    lines = [
        f"`{method}` is not trained here: {reason}."
        for method in METHODS
        if method not in results["methods"]
        and (reason := not_trained_because(method, backbone)) is not None
    ]
    return [*lines, ""] if lines else []


def _times_text(results: dict[str, Any]) -> str:
    """Which run of the demo measured each time, and how busy the machine was as it started:
    a rerun keeps earlier times, and a busy machine's are longer than an idle one's."""
    runs = results.get("runs", [])
    measured: dict[int | None, list[str]] = {}
    if results["cache_seconds"] is not None:
        measured.setdefault(results.get("cache_run"), []).append("the cache's build")
    for method, row in results["methods"].items():
        measured.setdefault(row.get("run"), []).append(f"`{method}`")
    parts = []
    for index, what in measured.items():
        if index is None or not 0 <= index < len(runs):  # recorded by an older demo
            parts.append(f"{_and(what)} by an earlier run of the demo, its load not recorded")
            continue
        run = runs[index]
        which = "this run" if index == len(runs) - 1 else "an earlier run of the demo"
        load = "no load average" if run["load"] is None else f"load average {run['load']:.2f}"
        text = f"{_and(what)} by {which} (started {run['started']}, {load} on {run['cores']} cores"
        busy = run["load"] is not None and run["load"] >= BUSY_LOAD * run["cores"]
        parts.append(f"{text}: busy, so longer than on an idle machine)" if busy else f"{text})")
    return f"Times measured: {'; '.join(parts)}." if parts else ""


def _noise_text(results: dict[str, Any]) -> list[str]:
    """How noisy a mean Dice over the held-out images is: each method's 95% interval, and what
    a difference inside it means."""
    intervals = {
        method: (row["dice"], interval, len(row["dice_per_image"]))
        for method, row in results["methods"].items()
        if (interval := mean_interval(row.get("dice_per_image") or [])) is not None
    }
    if not intervals:
        return []
    n = max(count for _, _, count in intervals.values())
    listed = "; ".join(
        f"`{method}` {dice:.3f} ({low:.3f} to {high:.3f})"
        for method, (dice, (low, high), _) in intervals.items()
    )
    widest = max(high - low for _, (low, high), _ in intervals.values())
    return [
        f"How noisy a mean over {n} held-out images is: each method's mean Dice with a 95% "
        f"bootstrap interval of that mean (its images resampled {RESAMPLES:,} times): {listed}. "
        f"The intervals are up to {widest:.3f} wide: a difference between methods inside them is "
        f"noise, which another draw of {n} images could reverse. The trade-off plot draws them "
        "as error bars, on a Dice axis from 0 to 1.",
        "",
    ]


def _memory_text(s: dict[str, Any], scale: dict[str, dict[str, Any]]) -> list[str]:
    """What the memory figures are, and what they say, every comparison from the figures."""
    lines = [
        "*Kept for backward*: the tensors autograd keeps from the forward pass of one training "
        f"step ({BATCH} images) until its backward, in fp32 on the plain path (the reference "
        "formulation, which keeps what the authors' code keeps), counted on PyTorch's meta "
        "device (shapes only, no arithmetic), with random weights (memory does not depend on "
        "them); the mask decoder's fused attention is counted as its kernel keeps it (queries, "
        "keys, values, output, log-sum-exp). Weights, gradients, optimiser state and buffers "
        "freed within the forward pass are not counted. The frozen encoder of `decoder` and "
        "`cad` runs without autograd and keeps nothing; SAM-Adapter and LoRA act inside the "
        "encoder, which then keeps its blocks' activations.",
        "",
        "## Memory at the paper's scale",
        "",
        "The paper's setting: ViT-B, batch 4, 512-pixel images (1024 for the encoder), CAD's "
        "adapter at 512. Counted here as above, beside the peak memory `cadsam bench` measured "
        f"while training, in one call of the project's own GPU benchmark ({GPU_BENCH['device']}, "
        f"fp32, cadsam's default `auto` runtime, {GPU_BENCH['date']}, commit "
        f"{GPU_BENCH['commit']}; {GPU_BENCH['source']}, benchmarks/BENCHMARKS.md), and the "
        f"paper's memory table for ViT-B ({PAPER_MEASURE}, {PAPER_DEVICE}). "
        f"{_missing_text(scale)}",
        "",
        *_scale_table(scale),
        "",
        f"{_gpu_notes()}{_comparisons(scale)}",
    ]
    if not backbone_config(s["backbone"]).pretrained:  # random weights: no release to load
        lines[1:1] = [
            "",
            "With random SAM weights the encoder's embedding carries little about the image; the "
            "adapter, which reads the image itself, is what can learn the task. At this toy "
            "scale a tiny encoder keeps less than CAD's adapter, so the memory in this run's "
            "column does not rank the methods as at the paper's scale: see below.",
        ]
    return lines


def _and(words: list[str]) -> str:
    """ "a", "a and b", "a, b and c": lists that read as a sentence."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _gpu_notes() -> str:
    """The GPU run's other rows that the memory table leaves out: LoRA recomputing its encoder
    blocks, CAD from the cache; "" where that run has none of them."""
    mib = GPU_BENCH["peak_allocated_mib"]
    notes = []
    if mib.get("lora-lean") is not None:
        notes.append(
            "LoRA with its encoder blocks recomputed in backward (`lora-lean`): "
            f"{_mib(mib['lora-lean'])} MiB"
        )
    if mib.get("cad-cache") is not None:
        lean = mib.get("cad-cache-lean")
        notes.append(
            f"CAD from cached embeddings (`cad-cache`): {_mib(mib['cad-cache'])} MiB"
            + ("" if lean is None else f", {_mib(lean)} under `lean`")
        )
    return f"From the same GPU benchmark: {'; '.join(notes)}. " if notes else ""


def _missing_text(scale: dict[str, dict[str, Any]]) -> str:
    """Why a cell of the memory table is "-": said so that nobody reads it as zero."""
    gpu = [NAMES[m] for m, s in scale.items() if s["gpu_bench_mib"] is None]
    paper = [NAMES[m] for m, s in scale.items() if s["paper_mib"] is None]
    parts = []
    if gpu:
        parts.append(f"that GPU run did not measure {_and(gpu)}; no other device's figure is used")
    if paper:
        parts.append(f"the paper has no {_and(paper)}")
    return f'"-": no figure from that source ({"; ".join(parts)}).' if parts else ""


def _against(scale: dict[str, dict[str, Any]], method: str, other: str) -> tuple[str, set[str]]:
    """("3.4x less kept for backward and 7.0x less at peak on the GPU", {"less"}): ``method``'s
    memory against ``other``'s in each source with a figure for both, and the directions."""
    parts, directions = [], set()
    for key, where, _ in SOURCES:
        a, b = scale[method][key], scale[other][key]
        if a is None or b is None:
            continue
        direction, ratio = ("more", a / b) if a >= b else ("less", b / a)
        times = f"{ratio:.2f}x" if ratio < 1.1 else f"{ratio:.1f}x"  # 1.04x, not 1.0x more
        parts.append(f"{times} {direction} {where}")
        directions.add(direction)
    return (_and(parts) if parts else ""), directions


def _most_text(scale: dict[str, dict[str, Any]]) -> str:
    """Which method needs the most memory in each source (among those with a figure)."""
    most: dict[str, list[str]] = {}
    for key, where, _ in SOURCES:
        figures = {m: s[key] for m, s in scale.items() if s[key] is not None}
        if figures:
            most.setdefault(max(figures, key=lambda m: figures[m]), []).append(where)
    if len(most) == 1:
        text = f"In every column {NAMES[next(iter(most))]} needs the most"
    else:
        text = "The most of each column's figures: " + "; ".join(
            f"{NAMES[m]} {_and(w)}" for m, w in most.items()
        )
    if all(m not in CACHEABLE for m in most):
        who = "it acts" if len(most) == 1 else "each acts"
        text += f" ({who} inside the encoder, which then keeps its activations)"
    return text + "."


def _comparisons(scale: dict[str, dict[str, Any]]) -> str:
    """The most in each source, then each pair of :data:`PAIRS` as multiples."""
    sentences = [_most_text(scale)]
    for method, other, expected, why in PAIRS:
        text, directions = _against(scale, method, other)
        if text:
            reason = f" ({why})" if expected and directions == {expected} else ""
            sentences.append(f"Against {NAMES[other]}, {NAMES[method]} needs {text}{reason}.")
    return " ".join(sentences)


def _plot_tradeoff(results: dict[str, Any], scale: dict[str, dict[str, Any]], path: Path) -> bool:
    """Save :func:`tradeoff_figure` to ``path``; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig = tradeoff_figure(results, scale)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def tradeoff_figure(results: dict[str, Any], scale: dict[str, dict[str, Any]]) -> Any:
    """Left: held-out Dice of this run against the memory kept for backward at ViT-B; right:
    ViT-B memory by source (counted here, the GPU benchmark, the paper), with no bar where a
    source has no figure. A matplotlib figure, so that tests can read its labels and bars."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for method, r in results["methods"].items():
        x, y = scale[method]["kept_mib"] / 1024, r["dice"]
        left.scatter(x, y, s=70, color=colors[method])
        left.annotate(LABELS[method], (x, y), textcoords="offset points", xytext=(6, 5))
        interval = mean_interval(r.get("dice_per_image") or [])
        if interval is not None:  # the mean's 95% interval: what another draw of images moves
            below, above = max(0.0, y - interval[0]), max(0.0, interval[1] - y)
            left.errorbar(x, y, yerr=[[below], [above]], color=colors[method], capsize=4)
    left.set_xlabel("kept for backward at ViT-B, batch 4, fp32, plain path (GiB)")
    left.set_ylabel(
        f"Dice, held out (this demo, {results['settings']['backbone']}),\n"
        f"mean over {results['settings']['n_test']} images, 95% interval"
    )
    left.set_xlim(0, max(s["kept_mib"] for s in scale.values()) / 1024 * 1.3)
    left.set_ylim(0, 1)  # the whole scale: a zoomed axis would magnify the noise of few images
    left.set_title("Accuracy here, memory at the paper's scale", fontsize=10)
    _memory_bars(right, scale, colors)
    fig.tight_layout()
    return fig


def _memory_bars(ax: Any, scale: dict[str, dict[str, Any]], colors: dict[str, str]) -> None:
    """One group of bars per source; a method the source has no figure for gets no bar (not a
    zero-height one), only a small "no figure" mark where its bar would stand."""
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        offset = (i - (len(METHODS) - 1) / 2) * width
        xs, heights = [], []
        for j, (key, _, _) in enumerate(SOURCES):
            if scale[method][key] is not None:
                xs.append(j + offset)
                heights.append(scale[method][key] / 1024)
                continue
            ax.text(
                j + offset,
                0.02,  # just above the axis, in axes units: a mark, not a bar
                "no figure",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=7,
                color="0.45",
                transform=ax.get_xaxis_transform(),
            )
        ax.bar(xs, heights, width, color=colors[method], label=LABELS[method])
    ax.set_xticks(range(len(SOURCES)), [label for _, _, label in SOURCES], fontsize=8)
    ax.set_ylabel("ViT-B, batch 4: each source's measure (GiB)")
    ax.set_title("Memory at the paper's scale, by source", fontsize=10)
    ax.legend(fontsize=8)


HELP = (
    "Train and compare decoder-only, SAM-Adapter, LoRA and CAD on a synthetic set, on a CPU, "
    "with nothing to download; writes a report with the paper-scale memory beside them."
)
DEMO_OUT = "cadsam-demo"
DEMO_EPOCHS = 10
DEMO_IMAGE_SIZE = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add(parser, "--out", metavar="DIR")
    flags.add(parser, "--checkpoint")
    flags.add(parser, "--backbone", choices=TEST_BACKBONES)
    parser.add_argument("--train-images", type=int, default=48, help="synthetic training images")
    parser.add_argument("--test-images", type=int, default=16, help="held-out images")
    flags.add_all(parser, "--image-size", "--epochs")
    flags.running_flags(parser)
    parser.epilog = (
        f"--out defaults to {DEMO_OUT}. Without --checkpoint the demo runs --backbone (default "
        "vit_tiny, unless one of Meta's SAM checkpoints is in the checkpoint cache) on random "
        "weights, saved under --out. Rerun it to reuse what is done."
    )


def run(args: argparse.Namespace) -> None:

    run_demo(
        args.out or DEMO_OUT,
        args.checkpoint,
        args.train_images,
        args.test_images,
        args.image_size or DEMO_IMAGE_SIZE,
        args.epochs or DEMO_EPOCHS,
        progress=args.progress is not False,
        backbone=args.backbone,
        runtime={"name": args.runtime_name or "auto", **common.settings(args)},
        device=args.device,
        precision=args.precision or "fp32",
    )
